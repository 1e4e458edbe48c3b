#!/bin/sh
# Install tether-agent on a device from an offline wheelhouse (make wheelhouse):
#
#   /opt/tether/                       a venv with tether and its dependencies
#   user and group tether              the agent's system user (sysusers.d)
#   /etc/tether/        root:tether 0750  agent.toml (an example, kept if present)
#   /etc/tether/pki/    root:tether 0750  ca.crt, agent.crt, agent.key: yours to
#                                         copy; made root:tether 0640 on each run
#   /etc/systemd/system/tether-agent.service
#
# Safe to run again: an unchanged wheelhouse installs nothing, a changed one
# replaces the packages and restarts a running agent. Needs only python3
# (3.11 or newer, with the venv module) and sh; no network, no pip on the
# device (pip runs from the wheel in the wheelhouse).
set -eu
# The venv must be readable by the agent's user whatever root's umask is.
umask 022

usage() {
    cat <<EOF
usage: $0 [--wheelhouse DIR] [--prefix DIR] [--python PYTHON]

  --wheelhouse DIR  folder made by 'make wheelhouse' (default: the folder of
                    this script if it holds wheels, else <repo>/wheelhouse)
  --prefix DIR      install below DIR instead of / (staging and tests; the
                    venv then only works at that path); skips systemctl
  --python PYTHON   interpreter for the venv (default: python3)
EOF
}

here=$(cd "$(dirname "$0")" && pwd)
prefix=/
wheelhouse=
python=python3
while [ $# -gt 0 ]; do
    case $1 in
        --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
        --prefix=*) prefix=${1#*=}; shift ;;
        --wheelhouse) wheelhouse=${2:?--wheelhouse needs a directory}; shift 2 ;;
        --wheelhouse=*) wheelhouse=${1#*=}; shift ;;
        --python) python=${2:?--python needs an interpreter}; shift 2 ;;
        --python=*) python=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

if [ -z "$wheelhouse" ]; then
    if ls "$here"/tether-*.whl >/dev/null 2>&1; then
        wheelhouse=$here
    else
        wheelhouse=$here/../../wheelhouse
    fi
fi
[ -d "$wheelhouse" ] || die "no wheelhouse at $wheelhouse (run 'make wheelhouse')"
wheelhouse=$(cd "$wheelhouse" && pwd)
ls "$wheelhouse"/tether-*.whl >/dev/null 2>&1 || die "no tether wheel in $wheelhouse"
pip_wheel=
for w in "$wheelhouse"/pip-*-py3-none-any.whl; do
    if [ -f "$w" ]; then pip_wheel=$w; fi
done
[ -n "$pip_wheel" ] || die "no pip wheel in $wheelhouse (run 'make wheelhouse')"

# The unit, the example settings: next to this script, or in the repo.
unit_src=$here/tether-agent.service
toml_src=$here/agent.toml.example
if [ ! -f "$unit_src" ] || [ ! -f "$toml_src" ]; then
    die "tether-agent.service or agent.toml.example missing next to $0"
fi

mkdir -p "$prefix"
prefix=$(cd "$prefix" && pwd)
root=${prefix%/}
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (or use --prefix for a staging install)"
fi

command -v "$python" >/dev/null 2>&1 || die "$python not found"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$python is $("$python" -V 2>&1); tether needs 3.11 or newer"
py_version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# The unit's ProtectHome=yes hides /root and /home from the agent, so a venv
# built on an interpreter there (pyenv, say) would not start under systemd.
py_real=$("$python" -c 'import os, sys; print(os.path.realpath(sys.executable))')
case $py_real in
    /root/*|/home/*|/run/user/*)
        if [ -z "$root" ]; then
            die "$python is $py_real, hidden from the service by ProtectHome=; use --python /usr/bin/python3"
        fi
        say "note: $py_real would be hidden from the service by ProtectHome= on a real install" ;;
esac

# The host's pip settings (extra indexes, constraints) must not leak in.
for var in $(env | sed -n 's/^\(PIP_[A-Z0-9_]*\)=.*/\1/p'); do unset "$var"; done
PIP_CONFIG_FILE=/dev/null
export PIP_CONFIG_FILE

opt=$root/opt/tether
venv_version=
if [ -x "$opt/bin/python" ]; then
    venv_version=$("$opt/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
fi
if [ "$venv_version" != "$py_version" ]; then
    say "creating the venv $opt (Python $py_version)"
    # --without-pip: Debian's python3 lacks ensurepip unless python3-venv is
    # installed; pip runs from the wheelhouse instead.
    "$python" -m venv --clear --without-pip "$opt"
fi

stamp=$opt/.wheelhouse.sha256
digest=$(
    cd "$wheelhouse"
    for f in *.whl *.tar.gz; do
        if [ -f "$f" ]; then sha256sum -- "$f"; fi
    done | sha256sum | cut -d' ' -f1
)-$py_version
changed=no
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ] && [ -x "$opt/bin/tether-agent" ]; then
    say "packages are up to date"
else
    say "installing tether from $wheelhouse"
    rm -f "$stamp"
    "$opt/bin/python" "$pip_wheel/pip" install --no-index --find-links "$wheelhouse" \
        --force-reinstall --disable-pip-version-check --no-warn-script-location \
        --quiet tether
    echo "$digest" > "$stamp"
    changed=yes
fi
"$opt/bin/tether-agent" --help >/dev/null || die "the installed tether-agent does not run"

# The agent's system user: declared in sysusers.d, created by systemd-sysusers
# (which also works on a --prefix root).
mkdir -p "$root/etc/sysusers.d" "$root/etc/systemd/system"
printf '%s\n' '# tether-agent.service runs as this user (deploy/systemd/install.sh)' \
    'u tether - "Tether edge agent" / /usr/sbin/nologin' > "$root/etc/sysusers.d/tether.conf"
if command -v systemd-sysusers >/dev/null 2>&1; then
    if [ -z "$root" ]; then
        systemd-sysusers tether.conf
    else
        systemd-sysusers --root="$root" tether.conf
    fi
elif [ -z "$root" ]; then
    getent group tether >/dev/null || groupadd --system tether
    getent passwd tether >/dev/null || useradd --system --gid tether --no-create-home \
        --home-dir / --shell /usr/sbin/nologin --comment "Tether edge agent" tether
else
    die "systemd-sysusers is needed to create the user below --prefix"
fi
gid=$(awk -F: '$1 == "tether" { print $3 }' "$root/etc/group")
[ -n "$gid" ] || die "group tether was not created"

# Settings and keys: root writes, the agent's group reads, nobody else.
# (Ownership needs root; a --prefix run by another user only gets the modes.)
own() { if [ "$(id -u)" -eq 0 ]; then chown 0:"$gid" "$@"; fi; }
install -d -m 0750 "$root/etc/tether" "$root/etc/tether/pki"
own "$root/etc/tether" "$root/etc/tether/pki"
chmod 0750 "$root/etc/tether" "$root/etc/tether/pki"
for f in "$root"/etc/tether/pki/*; do
    [ -f "$f" ] || continue
    own "$f"
    chmod 0640 "$f"
done
if [ ! -e "$root/etc/tether/agent.toml" ]; then
    install -m 0640 "$toml_src" "$root/etc/tether/agent.toml"
    own "$root/etc/tether/agent.toml"
    say "wrote $root/etc/tether/agent.toml: set the broker address and agent id there"
fi
install -m 0644 "$unit_src" "$root/etc/systemd/system/tether-agent.service"

if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    if [ "$changed" = yes ]; then
        systemctl try-restart tether-agent.service
    fi
fi

for f in ca.crt agent.crt agent.key; do
    [ -e "$root/etc/tether/pki/$f" ] || say "missing $root/etc/tether/pki/$f (copy it there and run again)"
done
say "done; start with: systemctl enable --now tether-agent"
