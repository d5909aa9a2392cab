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
        window_range_non_numeric = property(lambda self: open_())
    views = temporary_views = check_constraint_reflection = inline_check_constraint_reflection = \
        property(lambda self: open_())
    indexes_with_expressions = reflect_indexes_with_expressions = unicode_ddl = unbounded_varchar = \
        property(lambda self: open_())
    datetime_microseconds = timestamp_microseconds = time_microseconds = datetime_historic = \
        property(lambda self: open_())
    json_type = savepoints = dbapi_lastrowid = delete_from = mod_operator_as_percent_sign = \
        property(lambda self: open_())
    foreign_key_constraint_name_reflection = foreign_key_constraint_option_reflection_ondelete = \
        foreign_key_constraint_option_reflection_onupdate = property(lambda self: open_())
    fk_constraint_option_reflection_ondelete_restrict = fk_constraint_option_reflection_ondelete_noaction = \
        fk_constraint_option_reflection_onupdate_restrict = deferrable_fks = property(lambda self: open_())
    supports_bitwise_or = supports_bitwise_and = supports_bitwise_not = supports_bitwise_shift = \
        property(lambda self: open_())
    get_isolation_level_values = property(lambda self: open_())
    reflect_tables_no_columns = property(lambda self: closed())
    # SQLite has no schemas to create (ATTACH is how a file joins): test_schema is attached
    schema_create_delete = property(lambda self: closed())
    # pysqlite adds a Python REGEXP function to each connection; SQL runs in the daemon
    regexp_match = regexp_replace = property(lambda self: not_bastion)
    # TEMP tables and views live as long as the server transaction that made them
    temp_table_names = has_temp_table = property(lambda self: not_bastion)

    @property
    def temporary_tables(self):
        return not_bastion

    @property
    def temp_table_reflection(self):
        return not_bastion

    @property
    def temporary_views_(self):
        return not_bastion

    def get_isolation_levels(self, config):
        with config.db.connect() as conn:
            supported = conn.dialect.get_isolation_level_values(conn.connection.dbapi_connection)
        return {"default": "SERIALIZABLE", "supported": supported}
