"""Provisioning hooks of SQLAlchemy's dialect test suite for ``bastion://`` URLs
(``sqlalchemy.testing``; loaded by ``Dialect.load_provisioning()`` only when that suite
runs). The served database is given; its ``test_schema``/``test_schema_2`` are files
attached by the daemon's config (sqla_suite/conftest.py), never ATTACHed by a client.
"""

from sqlalchemy.testing.provision import create_db, drop_db, generate_driver_url, temp_table_keyword_args


@generate_driver_url.for_db("bastion")
def _driver_url(url, driver, query_str):
    # one driver, and "bastion+bastion" names no dialect: the URL as given
    return url if driver in (None, "bastion", "dbapi") and not query_str else None


@create_db.for_db("bastion")
def _create_db(cfg, eng, ident):  # SQLAlchemy's hook signature
    pass      # the daemon serves its configured databases only


@drop_db.for_db("bastion")
def _drop_db(cfg, eng, ident):
    pass


@temp_table_keyword_args.for_db("bastion")
def _temp_table_keyword_args(cfg, eng):
    return {"prefixes": ["TEMPORARY"]}
