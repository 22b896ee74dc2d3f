"""Where alerts go: the ``Notifier`` seam and its two kinds.

- ``Webhook``: the alert as JSON (collector/alerts/rules.py ``payload``), POSTed to a URL,
  signed with HMAC-SHA256 when a secret is configured (X-Bbprobe-Signature over
  "timestamp.body", X-Bbprobe-Timestamp), with X-Bbprobe-Alert-Id so that a receiver
  can drop a copy it already has (a delivery is at least once: a collector stopped
  between the receiver's 2xx and recording it sends again).
- ``AppriseNotifier``: Apprise (PyPI ``apprise``), one library for the services people
  read: email, Telegram, Slack, Matrix, ntfy, Discord...

A send returns an outcome, never raises: "delivered"; "retry" (a network error, a
timeout, 408, 429 or 5xx: the alerter tries again later, with backoff); or "failed"
(the receiver refused it for good, 4xx: retrying would not help).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Protocol

import aiohttp

from agent import credentials
from collector import __version__
from collector.alerts.rules import (
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Alert,
    payload,
    signature,
    title,
)
from collector.config import AlertsConfig, AppriseConfig, WebhookConfig
from collector.errors import ConfigError

# What a receiver may answer: read and dropped; a larger answer is not waited for.
MAX_REPLY_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Outcome:
    state: Literal["delivered", "retry", "failed"]
    error: str | None = None


class Notifier(Protocol):
    name: str
    triggers: tuple[str, ...]

    async def send(self, alert_id: int, created_at: str, alert: Alert) -> Outcome: ...


class Webhook:
    def __init__(self, cfg: WebhookConfig, secret: bytes | None, timeout_s: float) -> None:
        self.name = cfg.name
        self.triggers = cfg.triggers
        self.url = cfg.url
        self.secret = secret
        self.timeout_s = timeout_s

    async def send(self, alert_id: int, created_at: str, alert: Alert) -> Outcome:
        body = json.dumps(payload(alert_id, created_at, alert), sort_keys=True).encode()
        stamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", ID_HEADER: str(alert_id),
                   TIMESTAMP_HEADER: stamp, "User-Agent": f"bbprobe-collector/{__version__}"}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = signature(self.secret, stamp, body)
        try:
            async with asyncio.timeout(self.timeout_s), aiohttp.ClientSession() as http, \
                    http.post(self.url, data=body, headers=headers,
                              allow_redirects=False) as resp:
                await resp.content.read(MAX_REPLY_BYTES)
                status = resp.status
        except TimeoutError:
            return Outcome("retry", f"no answer within {self.timeout_s:g} s")
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome("retry", f"{type(exc).__name__}: {exc}"[:300])
        if 200 <= status < 300:
            return Outcome("delivered")
        if status in (408, 429) or status >= 500:
            return Outcome("retry", f"HTTP {status}")
        # Redirects are not followed (a signed body is for the URL configured), and
        # other 4xx say the receiver will not take it: retrying would not help.
        return Outcome("failed", f"HTTP {status}")


# Apprise sends synchronously: on threads of their own (not the loop's default executor,
# which aiohttp's DNS lookups share), a few at a time; a send waits for a thread before
# its timeout starts, so a burst of alerts queues instead of timing out unsent.
APPRISE_THREADS = 4
_apprise_pool = ThreadPoolExecutor(max_workers=APPRISE_THREADS,
                                   thread_name_prefix="bbprobe-apprise")
# One gate for the pool, shared by every Apprise notifier (made on first use, in the loop
# that sends); a thread still held by a send that timed out keeps its slot until it ends.
_apprise_gate: dict[str, asyncio.Semaphore] = {}


class AppriseNotifier:
    def __init__(self, cfg: AppriseConfig, url: str, timeout_s: float) -> None:
        self.name = cfg.name
        self.triggers = cfg.triggers
        self.url = url
        self.timeout_s = timeout_s

    async def send(self, alert_id: int, created_at: str, alert: Alert) -> Outcome:
        doc = payload(alert_id, created_at, alert)
        text = f"{alert.subject}\n\n{json.dumps(doc['details'], sort_keys=True)}"
        loop = asyncio.get_running_loop()
        gate = _apprise_gate.setdefault("gate", asyncio.Semaphore(APPRISE_THREADS))
        await gate.acquire()
        # Plugins loaded and the message sent on a thread; the timeout starts once a
        # thread is ours. A send still running at the deadline keeps its thread (and the
        # gate's slot) until it ends (Apprise's plugins time out their sockets); it is
        # recorded as a retry.
        work = loop.run_in_executor(_apprise_pool, self._send, title(alert), text)
        work.add_done_callback(lambda _: gate.release())
        try:
            async with asyncio.timeout(self.timeout_s):
                return await asyncio.shield(work)
        except TimeoutError:
            return Outcome("retry", f"no answer within {self.timeout_s:g} s")

    def _send(self, heading: str, text: str) -> Outcome:
        import apprise  # heavy (hundreds of plugins): loaded when an alert is first sent

        service = apprise.Apprise()
        if not service.add(self.url):
            return Outcome("failed", "Apprise does not accept this URL (see its wiki for "
                                     "the service's syntax)")
        ok = service.notify(title=heading, body=text)
        return Outcome("delivered") if ok else Outcome("retry", "Apprise reported a failure")


def _secret(credential: str, env: str, environ: Mapping[str, str], key: str) -> str | None:
    if credential and (environ.get("CREDENTIALS_DIRECTORY") or not environ.get(env or "")):
        try:
            return credentials.read(credential, environ, key)
        except credentials.CredentialError as exc:
            raise ConfigError(str(exc)) from None
    if env:
        value = environ.get(env, "")
        if not value:
            raise ConfigError(f"{key}: the environment variable {env} is not set")
        return value
    return None


def build(cfg: AlertsConfig, environ: Mapping[str, str] = os.environ) -> list[Notifier]:
    """The configured notifiers, their secrets read now (a missing one is a ConfigError
    at start, not a failed alert at 3 a.m.)."""
    out: list[Notifier] = []
    for i, hook in enumerate(cfg.webhooks):
        secret = _secret(hook.secret_credential, hook.secret_env, environ,
                         f"alerts.webhooks[{i}].secret")
        out.append(Webhook(hook, secret.strip().encode() if secret else None, cfg.timeout_s))
    for i, app in enumerate(cfg.apprise):
        url = app.url or _secret(app.url_credential, app.url_env, environ,
                                 f"alerts.apprise[{i}].url")
        if not url:
            raise ConfigError(f"alerts.apprise[{i}].url: empty")
        out.append(AppriseNotifier(app, url.strip(), cfg.timeout_s))
    return out
