"""How uvicorn serves t2i: its options, and a request deadline that uvicorn lacks.

uvicorn closes idle keep-alive connections, but a client that sends a request a byte at a time (headers
that never end, a body that never ends: "slow loris") holds its connection, a file descriptor and a
parser for as long as it likes. `deadline_protocol` gives every request `client_timeout` seconds to
arrive whole, headers and body, from the connection's start or the end of the previous response;
past that the server answers `408 Request Timeout` (if it has answered nothing yet) and closes the
connection. A request that has arrived has no deadline here: generating takes as long as it takes.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class _DeadlineH11(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for each request to arrive whole (`client_timeout` seconds)."""

    client_timeout: float = 30.0
    _deadline = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()  # the request is in; the app may take its time

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection has its own deadline

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.client_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app reading the body gets http.disconnect
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and self.conn.their_state != h11.IDLE:
            try:
                body = b"the request did not arrive whole in time\n"
                for event in (h11.Response(status_code=408, headers=[("content-type", "text/plain"),
                                                                     ("content-length", str(len(body))),
                                                                     ("connection", "close")]),
                              h11.Data(data=body), h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:
                pass  # a response had begun after all: just close
        self.transport.close()


def deadline_protocol(client_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with this request deadline (pass it as uvicorn's `http`)."""
    return type("T2IH11Protocol", (_DeadlineH11,), {"client_timeout": float(client_timeout)})


def uvicorn_options(config) -> dict:
    """The keyword arguments of `uvicorn.run` / `uvicorn.Config` for a `ServerConfig`."""
    return {"host": config.host, "port": config.port, "access_log": False, "log_level": "warning",
            "http": deadline_protocol(config.client_timeout)}
