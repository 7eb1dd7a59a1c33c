"""Test support shared by every test folder: free ports, waits, TLS contexts, the session PKI,
paho probes, broker and registry data folders and settings, PostgreSQL, a migrated SQLite
template and `certfleet` subprocesses.

Helpers live here once; a test folder imports them from here, never from another folder's
``conftest.py`` or test module. Fixtures stay in ``conftest.py`` files (pytest finds them
there); the ones several folders use are defined in :mod:`tests.support.broker_fixtures`
and :mod:`tests.support.registry_fixtures`.
"""
