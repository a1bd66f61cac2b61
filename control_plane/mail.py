"""Outgoing mail: SMTP when ``SMTP_URL`` is set, else an outbox directory (development).

Mail is handed over only after the transaction that produced it committed
(:meth:`Mailer.enqueue` is called by the routes after commit), and is delivered in the
background: a request for a known email must not take measurably longer than one for an unknown
email (forgot-password must not reveal who has an account).

Logging: recipients and subjects are logged, message bodies never (they carry tokens) — except
in development with the outbox, where the link is printed to the console so a developer can
follow it without a mail server.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import ssl
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from control_plane.settings import Settings, SettingsError

logger = logging.getLogger("control_plane.mail")


@dataclass(frozen=True, slots=True)
class Mail:
    to: str
    subject: str
    text: str
    #: The one link the mail is about (printed to the console in development only).
    link: str | None = None


class Transport(Protocol):
    async def deliver(self, message: EmailMessage, mail: Mail) -> None: ...


class SmtpTransport:
    """SMTP with the standard library client, run in a thread.

    ``smtp://`` (plain; use for a local relay), ``smtp+starttls://`` (STARTTLS required),
    ``smtps://`` (implicit TLS). Credentials come from the URL's user info.
    """

    def __init__(self, url: str, *, timeout: float = 15.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtp+starttls", "smtps") or not parts.hostname:
            raise SettingsError(
                "QUOROOM_CP_SMTP_URL", "must be smtp://, smtp+starttls:// or smtps://"
            )
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or {"smtp": 25, "smtp+starttls": 587, "smtps": 465}[parts.scheme]
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.timeout = timeout

    def _send(self, message: EmailMessage) -> None:
        context = ssl.create_default_context()
        client: smtplib.SMTP
        if self.scheme == "smtps":
            client = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=context)
        else:
            client = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        with client:
            if self.scheme == "smtp+starttls":
                client.starttls(context=context)
            if self.username is not None:
                client.login(self.username, self.password or "")
            client.send_message(message)

    async def deliver(self, message: EmailMessage, mail: Mail) -> None:
        await asyncio.to_thread(self._send, message)


class OutboxTransport:
    """Writes each message as an ``.eml`` file; in development also prints the link."""

    def __init__(self, directory: Path, *, console: bool) -> None:
        self.directory = directory
        self.console = console

    def _write(self, message: EmailMessage) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{uuid.uuid4().hex}.eml"
        path.write_bytes(message.as_bytes())
        return path

    async def deliver(self, message: EmailMessage, mail: Mail) -> None:
        path = await asyncio.to_thread(self._write, message)
        if self.console:
            # Development only: the developer is the recipient; production never gets here
            # (SMTP_URL is required there).
            print(
                f"[mail] to {mail.to}: {mail.subject}\n       {mail.link or ''}\n       ({path})",
                flush=True,
            )


class Mailer:
    """Queues mail after commit and delivers it in the background with a few retries."""

    attempts = 3
    retry_delay = 1.0

    def __init__(self, settings: Settings, transport: Transport | None = None) -> None:
        self.sender = settings.mail_from
        if transport is None:
            if settings.smtp_url is not None:
                transport = SmtpTransport(settings.smtp_url.get_secret_value())
            else:
                transport = OutboxTransport(settings.outbox_dir, console=settings.development)
        self.transport = transport
        self._tasks: set[asyncio.Task[None]] = set()

    def build(self, mail: Mail) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = mail.to
        message["Subject"] = mail.subject
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = make_msgid(domain="quoroom.local")
        message.set_content(mail.text)
        return message

    def enqueue(self, *mails: Mail) -> None:
        """Deliver ``mails`` in the background. Call only after the transaction committed."""
        for mail in mails:
            task = asyncio.get_running_loop().create_task(self._deliver(mail))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def run_then_send(self, job: Callable[[], Awaitable[Sequence[Mail]]], *, what: str) -> None:
        """Run ``job`` in the background, then deliver the mail it returns.

        For work that must not delay the answer (issue 12: equal timing for known and unknown
        addresses). ``job`` commits its own transaction before returning. A failure is logged by
        its type only: SQL errors can carry parameters (emails, password hashes)."""
        task = asyncio.get_running_loop().create_task(self._run(job, what))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, job: Callable[[], Awaitable[Sequence[Mail]]], what: str) -> None:
        try:
            mails = await job()
        except Exception as exc:
            logger.error("background %s failed: %s", what, type(exc).__name__)
            return
        self.enqueue(*mails)

    async def _deliver(self, mail: Mail) -> None:
        message = self.build(mail)
        for attempt in range(1, self.attempts + 1):
            try:
                await self.transport.deliver(message, mail)
            except (OSError, smtplib.SMTPException) as exc:
                logger.warning(
                    "mail %r to %s failed (attempt %d/%d): %s",
                    mail.subject,
                    mail.to,
                    attempt,
                    self.attempts,
                    type(exc).__name__,
                )
                if attempt < self.attempts:
                    await asyncio.sleep(self.retry_delay * 2 ** (attempt - 1))
            else:
                logger.info("mail %r sent to %s", mail.subject, mail.to)
                return
        logger.error("mail %r to %s was not delivered", mail.subject, mail.to)

    async def drain(self) -> None:
        """Wait for every queued delivery (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self, grace: float = 10.0) -> None:
        try:
            async with asyncio.timeout(grace):
                await self.drain()
        except TimeoutError:
            for task in list(self._tasks):
                task.cancel()
            logger.warning("shutdown: %d mails were not delivered", len(self._tasks))
