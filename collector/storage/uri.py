"""A PostgreSQL connection URI as messages and logs show it: its password masked.

Pure (no driver): the CLI and the web app show a ``postgresql://`` URI whether or not they
ever open it, and a process that never opens PostgreSQL never imports psycopg. The URI is
read as libpq reads it (PostgreSQL documentation, "Connection URIs"; fe-connect.c
``conninfo_uri_parse_options``): ``postgresql://[user[:password]@][host[:port][,...]]
[/dbname][?key=value&...]``, percent-decoded, an IPv6 host in brackets, ``ssl=true`` read
as ``sslmode=require``, and only libpq's own keywords in the query. A URI libpq would
refuse is not shown at all: its parts may hold the password anywhere.
"""

from __future__ import annotations

from urllib.parse import quote

SCHEMES = ("postgresql://", "postgres://")

# libpq's connection keywords (PQconndefaults), in the order of its option table: the
# order a parsed URI's query parameters are shown in.
KEYWORDS = (
    "service", "user", "password", "passfile", "channel_binding", "connect_timeout",
    "dbname", "host", "hostaddr", "port", "client_encoding", "options", "application_name",
    "fallback_application_name", "keepalives", "keepalives_idle", "keepalives_interval",
    "keepalives_count", "tcp_user_timeout", "sslmode", "sslnegotiation", "sslcompression",
    "sslcert", "sslkey", "sslcertmode", "sslpassword", "sslrootcert", "sslcrl", "sslcrldir",
    "sslsni", "requirepeer", "require_auth", "min_protocol_version", "max_protocol_version",
    "ssl_min_protocol_version", "ssl_max_protocol_version", "gssencmode", "krbsrvname",
    "gsslib", "gssdelegation", "replication", "target_session_attrs", "load_balance_hosts",
    "scram_client_key", "scram_server_key", "oauth_issuer", "oauth_client_id",
    "oauth_client_secret", "oauth_scope", "sslkeylogfile",
)

UNPARSED = "<a PostgreSQL URI that does not parse: check its percent-encoding>"


class _Refused(ValueError):
    """A URI libpq would refuse."""


def _decoded(text: str) -> str:
    """Percent-decoding as libpq does it: spaces around the text are dropped and one
    inside it is refused (a space must be %20), every ``%`` starts two hex digits,
    ``%00`` is refused, ``+`` is itself; the bytes are UTF-8."""
    text = text.strip(" ")
    if " " in text:
        raise _Refused("unexpected spaces (a space is %20)")
    out = bytearray()
    i = 0
    raw = text.encode()
    while i < len(raw):
        if raw[i] != ord("%"):
            out.append(raw[i])
            i += 1
            continue
        digits = raw[i + 1:i + 3]
        try:
            if len(digits) != 2 or not digits.isalnum():
                raise ValueError(digits)
            value = int(digits, 16)
        except ValueError:
            raise _Refused("invalid percent-encoded token") from None
        if value == 0:
            raise _Refused("forbidden value %00 in percent-encoded value")
        out.append(value)
        i += 3
    try:
        return out.decode()
    except UnicodeDecodeError:
        raise _Refused("not UTF-8 once decoded") from None


def _until(text: str, i: int, stops: str) -> int:
    while i < len(text) and text[i] not in stops:
        i += 1
    return i


def parse(url: str) -> dict[str, str]:
    """The connection parameters a URI sets, by libpq keyword in libpq's order; raises
    ValueError for a URI libpq would refuse."""
    scheme = next((s for s in SCHEMES if url.startswith(s)), None)
    if scheme is None:
        raise _Refused("not a postgresql:// URI")
    text = url[len(scheme):]
    found: dict[str, str] = {}
    i = _until(text, 0, "@/")
    if i < len(text) and text[i] == "@":
        colon = _until(text, 0, ":@")
        if colon:
            found["user"] = _decoded(text[:colon])
        if text[colon] == ":" and colon + 1 < i:
            found["password"] = _decoded(text[colon + 1:i])
        i += 1
    else:
        i = 0
    hosts: list[str] = []
    ports: list[str] = []
    stop = ""
    while True:
        if i < len(text) and text[i] == "[":
            end = text.find("]", i + 1)
            if end < 0:
                raise _Refused('no matching "]" in an IPv6 host address')
            if end == i + 1:
                raise _Refused("IPv6 host address may not be empty")
            host, i = text[i + 1:end], end + 1
            if i < len(text) and text[i] not in ":/?,":
                raise _Refused("unexpected character after an IPv6 host address")
        else:
            end = _until(text, i, ":/?,")
            host, i = text[i:end], end
        hosts.append(host)
        stop = text[i] if i < len(text) else ""
        port = ""
        if stop == ":":
            end = _until(text, i + 1, "/?,")
            port, i = text[i + 1:end], end
            stop = text[i] if i < len(text) else ""
        ports.append(port)
        if stop != ",":
            break
        i += 1
    # As libpq keeps them: the hosts joined by commas, and the ports likewise (a host
    # without one leaves its place empty), each kept when the joined text is not empty.
    if host_list := ",".join(hosts):
        found["host"] = _decoded(host_list)
    if port_list := ",".join(ports):
        found["port"] = _decoded(port_list)
    if stop and stop != "?":
        end = _until(text, i + 1, "?")
        if end > i + 1:
            found["dbname"] = _decoded(text[i + 1:end])
        i = end
        stop = text[i] if i < len(text) else ""
    rest = text[i + 1:] if stop else ""
    while rest:
        # One "&" may end the query; an empty parameter anywhere else is refused.
        pair, _amp, rest = rest.partition("&")
        key, sep, value = pair.partition("=")
        if not sep or "=" in value:
            raise _Refused("a query parameter is not one key=value")
        key, value = _decoded(key), _decoded(value)
        if key == "ssl" and value == "true":  # JDBC's spelling
            key, value = "sslmode", "require"
        elif key == "requiressl":  # libpq's old spelling
            key, value = "sslmode", "require" if value[:1] == "1" else "prefer"
        if key not in KEYWORDS:
            raise _Refused(f"invalid URI query parameter {key!r}")
        found[key] = value
    return {k: found[k] for k in KEYWORDS if k in found}


def masked(url: str) -> str:
    """The URI as shown in messages and logs: any password (in the user part or as a
    ``password=`` parameter) replaced by ***. A URI libpq cannot parse is not shown at
    all (its text may hold the password anywhere)."""
    try:
        params = parse(url)
    except ValueError:
        return UNPARSED
    user = params.pop("user", None)
    secret = params.pop("password", None)
    host = params.pop("host", "")
    port = params.pop("port", "")
    dbname = params.pop("dbname", "")
    hosts = host.split(",") if host else []
    ports = port.split(",") if port else []
    netloc = ",".join(h if "/" not in h else quote(h, safe="") for h in hosts)
    if ports:
        netloc = ",".join(f"{h}:{p}" for h, p in zip(hosts or [""] * len(ports), ports,
                                                      strict=False))
    if user is not None:
        netloc = f"{user}{':***' if secret is not None else ''}@{netloc}"
    elif secret is not None:
        netloc = f":***@{netloc}"
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"postgresql://{netloc}/{dbname}" + (f"?{query}" if query else "")
