"""The pass loop under replication's shipper and sync's syncer: a pass's result says how it went
with a verdict (never an exit code), and its status is typed (LoopStatus) with the keys
`replicate status` and `sync status` have always shown."""

from __future__ import annotations

import re
from typing import Any

from bastion.errors import BastionError
from bastion.passloop import LoopStatus, PassLoop
from bastion.schedule import Timing

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class Flaky(PassLoop):
    """Fails while ``broken`` is set, like a pass whose peer does not answer."""

    broken = True

    def _cycle(self) -> dict[str, Any]:
        if self.broken:
            raise BastionError("the peer did not answer")
        return {"database": self.name, "sent": 3}


def test_a_pass_says_how_it_went_and_the_status_is_typed() -> None:
    loop = Flaky("bank", "test loop of bank", Timing("manual"), None, {})
    loop.max_backoff = 0.05
    loop.start("test-loop")
    try:
        res = loop.run_now(timeout=30)
        assert res == {"database": "bank", "error": "the peer did not answer", "verdict": "failed"}
        st = loop.loop_status()
        assert isinstance(st, LoopStatus) and st.failures == 1 and st.last_error == "the peer did not answer"
        d = st.to_dict()
        assert set(d) == {"state", "last_error", "last_error_at", "failures", "last_success_at"}
        assert ISO.fullmatch(d["last_error_at"]) and d["last_success_at"] is None
        loop.broken = False
        res = loop.run_now(timeout=30)
        assert res == {"database": "bank", "sent": 3, "verdict": "ok"} and "exit_code" not in res
        d = loop.loop_status().to_dict()
        assert d["failures"] == 0 and ISO.fullmatch(d["last_success_at"])
    finally:
        loop.stop()
