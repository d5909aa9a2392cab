"""SQLAlchemy's own dialect compliance suite, unchanged."""

from sqlalchemy.testing.suite import *
