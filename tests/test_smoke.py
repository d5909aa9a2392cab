import time

from support import check_bank, sha256


def test_startbu_copy_endbu_while_app_writes(daemon, bank, tmp_path):
    bank.start()
    r = daemon.cli("startbu", "bank", "--json")
    assert r.code == 0, r.err
    before = sha256(bank.bank), sha256(bank.audit)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "bank.db").write_bytes(bank.bank.read_bytes())
    (copy / "audit.db").write_bytes(bank.audit.read_bytes())
    n0 = bank.transfers()
    time.sleep(1)
    assert bank.transfers() > n0, "the application must keep writing"
    assert (sha256(bank.bank), sha256(bank.audit)) == before
    r = daemon.cli("endbu", "bank", "--json")
    assert r.code == 0, r.err
    assert r.json["consistent"] is True
    stats = bank.stop()
    assert stats["errors"] == {}
    res = check_bank(copy)
    assert res["ok"], res
    assert check_bank(bank.dir)["ok"]
