"""A plugin that exits at import: no success, one error line."""
raise SystemExit(0)
