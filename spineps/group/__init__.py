"""The group level: tables (and later the report) built only from participant outputs."""
