"""Lower per-message latency in pynetdicom's acceptor, without changing what it does.

pynetdicom's association reactor polls its DIMSE queue with a fixed 1 ms ``sleep`` per loop, and its
DUL thread sleeps 1 ms whenever it finds nothing to do, so every C-STORE pays several polling delays
(measured: ~2x slower than the socket allows for 512 KiB instances). :class:`FastAcceptor` blocks on
the DIMSE queue instead (it wakes the moment a message is complete) and checks release/abort between
waits as the original loop does; the DUL idle delay is shortened. Checked against pynetdicom 3.0.
"""

from __future__ import annotations

import queue

from pynetdicom import evt
from pynetdicom.association import Association

DUL_IDLE_DELAY_S = 0.0002
POLL_S = 0.005


class FastAcceptor(Association):
    """pynetdicom's acceptor with a blocking DIMSE wait in place of the 1 ms poll."""

    def _run_reactor(self) -> None:  # mirrors pynetdicom 3.0 Association._run_reactor
        self._is_paused = False
        self.dul._run_loop_delay = DUL_IDLE_DELAY_S
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=POLL_S)
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                self._serve_request(msg, context_id)
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return
