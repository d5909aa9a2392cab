"""What the suite may expect: SQLite's features, as served by Bastion.

One requirements class for both runs (Bastion and SQLAlchemy's own ``sqlite:///`` file
dialect), so the comparison is on the same selection; the few differences are Bastion's
documented exceptions (docs/sql.md, "SQLAlchemy's compliance suite"), keyed on the
driver name below.
"""

from sqlalchemy.testing import exclusions
from sqlalchemy.testing.requirements import SuiteRequirements

open_, closed = exclusions.open, exclusions.closed


def _bastion(config):
    return config.db.dialect.driver == "bastion"


not_bastion = exclusions.skip_if(_bastion, "not through Bastion's SQL server (docs/sql.md)")


class Requirements(SuiteRequirements):
    # SQL that SQLite has
    intersect = except_ = window_functions = window_range = window_range_numeric = \
        property(lambda self: open_())
    views = property(lambda self: open_())
    indexes_with_expressions = unicode_ddl = unbounded_varchar = reflects_pk_names = reflect_table_options = \
        property(lambda self: open_())
    datetime_microseconds = timestamp_microseconds = time_microseconds = datetime_historic = \
        property(lambda self: open_())
    json_type = savepoints = dbapi_lastrowid = delete_from = mod_operator_as_percent_sign = \
        property(lambda self: open_())
    foreign_key_constraint_name_reflection = property(lambda self: open_())
    supports_bitwise_or = supports_bitwise_and = supports_bitwise_not = supports_bitwise_shift = \
        property(lambda self: open_())
    get_isolation_level_values = property(lambda self: open_())
    # where SQLite (and so both runs) falls short of the suite: its RANGE frames take numbers
    # only; a SELECT with LIMIT cannot be parenthesized inside a UNION; the reflection of
    # CHECK constraints, of index expressions and of cross-schema keys is partial
    reflect_tables_no_columns = window_range_non_numeric = property(lambda self: closed())
    parens_in_union_contained_select_w_limit_offset = property(lambda self: closed())
    parens_in_union_contained_select_wo_limit_offset = property(lambda self: closed())
    check_constraint_reflection = inline_check_constraint_reflection = property(lambda self: closed())
    reflect_indexes_with_expressions = property(lambda self: closed())
    # SQLite has no schemas to create (ATTACH is how a file joins): test_schema is attached
    schema_create_delete = property(lambda self: closed())
    # pysqlite adds a Python REGEXP function to each connection; SQL runs in the daemon
    regexp_match = regexp_replace = property(lambda self: not_bastion)
    # TEMP tables and views live as long as the server transaction that made them
    temp_table_names = has_temp_table = temporary_views = property(lambda self: not_bastion)

    @property
    def temporary_tables(self):
        return not_bastion

    @property
    def temp_table_reflection(self):
        return not_bastion

    def get_isolation_levels(self, config):
        with config.db.connect() as conn:
            supported = conn.dialect.get_isolation_level_values(conn.connection.dbapi_connection)
        return {"default": "SERIALIZABLE", "supported": supported}
