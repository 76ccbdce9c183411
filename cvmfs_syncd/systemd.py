"""The sd_notify protocol: readiness, status, reload, stop and watchdog messages to systemd.

systemd passes a datagram socket address in ``$NOTIFY_SOCKET`` (a filesystem path, or a name
in the abstract namespace written with a leading ``@``); each notification is one datagram
of newline-separated ``KEY=value`` assignments. When the variable is absent the process is
not supervised by a ``Type=notify`` unit and every method here does nothing.

Sending never raises: a lost notification must not take the daemon down, so failures are
logged (once per outage, not once per watchdog ping) and reported as ``False``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import MutableMapping
from types import TracebackType

__all__ = ["Notifier"]

logger = logging.getLogger(__name__)

_ENVIRONMENT_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends sd_notify messages to the service manager, or nothing when there is none.

    Build it with :meth:`from_environment` at start-up. The watchdog is enabled only when
    systemd asked for it (``WATCHDOG_USEC``) and addressed this process (``WATCHDOG_PID``,
    when set, equals our pid); :meth:`watchdog_interval` then says how often to ping.
    """

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        """Given the socket address (path or ``@name``, None = not under systemd) and the
        watchdog timeout in microseconds (None = no watchdog), make a notifier.

        An address that is neither absolute nor abstract is refused with a warning and the
        notifier is disabled, as systemd itself only ever passes those two forms.
        """
        self._address: str | None = _socket_address(address)
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._socket: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environment(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset: bool = False,
        pid: int | None = None,
    ) -> Notifier:
        """Given an environment (default ``os.environ``), return a notifier configured from
        ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        ``pid`` (default: this process) is compared with ``WATCHDOG_PID``; a watchdog meant
        for another process is ignored. With ``unset`` the three variables are removed from
        the environment afterwards, so child processes (``cvmfs_server``) do not inherit a
        socket that is not theirs. Malformed numbers disable the watchdog with a warning.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog_usec = _positive_int(env, "WATCHDOG_USEC")
        watchdog_pid = env.get("WATCHDOG_PID")
        if watchdog_usec is not None and watchdog_pid:
            own_pid = os.getpid() if pid is None else pid
            if _positive_int(env, "WATCHDOG_PID") != own_pid:
                logger.debug("watchdog is addressed to pid %s, not %s", watchdog_pid, own_pid)
                watchdog_usec = None
        if unset:
            for key in _ENVIRONMENT_KEYS:
                env.pop(key, None)
        return cls(address, watchdog_usec)

    @property
    def enabled(self) -> bool:
        """True when there is a service manager to talk to."""
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Return how many seconds may pass between two :meth:`watchdog` pings (half the
        configured timeout, as systemd recommends), or None when no watchdog is expected."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd that start-up (or a reload) has finished, optionally with a status
        line. Return True when the message was delivered."""
        fields = ["READY=1"]
        if status is not None:
            fields.append("STATUS=" + _one_line(status))
        return self._send(fields)

    def status(self, text: str) -> bool:
        """Set the free-form status line ``systemctl status`` shows. Return True if sent."""
        return self._send(["STATUS=" + _one_line(text)])

    def reloading(self) -> bool:
        """Tell systemd that a configuration reload has begun; send :meth:`ready` when it
        is done. Return True if sent.

        The message carries ``MONOTONIC_USEC`` (``CLOCK_MONOTONIC`` in microseconds) so that
        systemd can tell this reload apart from an earlier one.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(["RELOADING=1", f"MONOTONIC_USEC={now_usec}"])

    def stopping(self) -> bool:
        """Tell systemd that an orderly shutdown has begun. Return True if sent."""
        return self._send(["STOPPING=1"])

    def extend_timeout(self, seconds: float) -> bool:
        """Ask systemd for ``seconds`` more before the current start, reload or stop times
        out (e.g. while recovery finishes a pending publish). Return True if sent."""
        return self._send([f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}"])

    def watchdog(self) -> bool:
        """Ping the watchdog; a no-op (False) unless systemd enabled it for this process.

        Call it only from the health-checked main loop: a ping says "the daemon is making
        progress", so nothing that keeps pinging while a lane is stuck may call it.
        """
        if self.watchdog_interval() is None:
            return False
        return self._send(["WATCHDOG=1"])

    def close(self) -> None:
        """Close the sending socket; later messages open a new one."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Notifier:
        """Return self, so that ``with`` closes the socket at the end."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the socket."""
        self.close()

    def _send(self, fields: list[str]) -> bool:
        """Send one datagram of ``fields``; log and return False on any socket error."""
        if self._address is None:
            return False
        message = "\n".join(fields).encode("utf-8")
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.sendto(message, self._address)
        except OSError as error:
            if not self._failing:
                logger.warning(
                    "cannot notify systemd via %s: %s (%s)",
                    _printable(self._address),
                    error,
                    fields[0],
                )
            self._failing = True
            self.close()
            return False
        if self._failing:
            logger.info("notifying systemd via %s works again", _printable(self._address))
            self._failing = False
        return True


def _socket_address(address: str | None) -> str | None:
    """Given ``$NOTIFY_SOCKET``, return the address for ``sendto`` (``@x`` becomes the
    abstract ``\\0x``), or None when it is empty or of a form we do not support."""
    if not address:
        return None
    if address.startswith("@"):
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    logger.warning("ignoring NOTIFY_SOCKET=%r: not an absolute path or @abstract name", address)
    return None


def _positive_int(env: MutableMapping[str, str], key: str) -> int | None:
    """Return ``env[key]`` as a positive integer, None when absent; warn when malformed."""
    raw = env.get(key)
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        logger.warning("ignoring %s=%r: not an integer", key, raw)
        return None
    if value <= 0:
        logger.warning("ignoring %s=%r: not positive", key, raw)
        return None
    return value


def _one_line(text: str) -> str:
    """Return ``text`` with line breaks replaced: a newline would end the assignment."""
    return " ".join(text.splitlines())


def _printable(address: str) -> str:
    """Return the address as systemd writes it (``@name`` for the abstract namespace)."""
    return "@" + address[1:] if address.startswith("\0") else address
