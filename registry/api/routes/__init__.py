"""One router per resource, each carrying its full path under ``API_PREFIX``."""

API_PREFIX = "/api/v1"
