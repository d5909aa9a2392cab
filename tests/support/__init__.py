"""What the tests and the bench scripts share: processes, ports, waits, configs, the bank, content.

Importable as `support`: pytest puts tests/ on sys.path (tests/conftest.py sits there, rootdir
import mode), and bench/_common.py puts it there for the bench scripts. tests/ stays a plain
folder, not a package, so the test modules keep their short names.
"""

from support.bank import App, check_bank, init_bank
from support.daemon import DaemonProc, Result, serve_refused, write_config
from support.data import content, dump, integrity, sha256, user_rows
from support.proc import PY, free_port, wait_for

__all__ = ["PY", "App", "DaemonProc", "Result", "check_bank", "content", "dump", "free_port", "init_bank", "integrity",
           "serve_refused", "sha256", "user_rows", "wait_for", "write_config"]
