"""Names shared by the certificate issuer (``tether certs``) and the broker's
role checks (:mod:`broker.roles`): subject common names and the role markers
written as the subject's organizationalUnitName (OU)."""

from __future__ import annotations

DEFAULT_CLUSTER = "default"
DEFAULT_AGENT = "agent-1"
CA_CN_PREFIX = "tether-ca "
BROKER_CN = "tether-broker"
FRONTEND_CN = "tether-frontend"
FRONTEND_CA_CN_PREFIX = "tether-frontend-ca "
#: Role markers, written as the subject's organizationalUnitName (OU).
ROLE_AGENT = "tether-agent"
ROLE_FRONTEND = "tether-frontend"
