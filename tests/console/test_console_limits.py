"""The console's sign-in rate limit under concurrent bursts, over real HTTPS, on SQLite and
PostgreSQL: an attempt is taken before its token is checked, atomically, so a burst released
at once never gets more tokens checked than the limit (issue 22, item 4)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from registry.server import RegistryServer
from registry.settings import RegistrySettings
from tests.conftest import ClientFiles
from tests.console.conftest import Console, csrf_of, make_token

ConsoleAt = Callable[[str, ClientFiles | None], Console]

BURST = 30
LIMIT = 5


def _burst(consoles: list[Console], tokens: list[str]) -> Counter[int]:
    """Post every sign-in form at the same moment; the statuses answered, counted."""
    forms = []
    for console in consoles:
        page = console.http.get("/ui/sign-in")
        assert page.status_code == 200, page.text
        forms.append(csrf_of(page.text))
    barrier = threading.Barrier(len(consoles))
    statuses: list[int] = []
    lock = threading.Lock()

    def post(console: Console, csrf: str, token: str) -> None:
        barrier.wait(timeout=30)
        response = console.http.post(
            "/ui/sign-in", data={"token": token, "csrf_token": csrf, "next": ""}
        )
        with lock:
            statuses.append(response.status_code)

    threads = [
        threading.Thread(target=post, args=(console, csrf, token))
        for console, csrf, token in zip(consoles, forms, tokens, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(statuses) == len(consoles), "a sign-in did not answer within 60 s"
    return Counter(statuses)


def _checked(server: RegistryServer) -> float:
    """Tokens checked and refused so far (the auth refusal counter of bad tokens)."""
    value: float = server.state.metrics.auth_refusals.labels("console_bad_token")._value.get()
    return value


def test_a_burst_of_wrong_tokens_gets_no_more_checked_than_the_limit(
    registry_settings: RegistrySettings, console_at: ConsoleAt
) -> None:
    settings = registry_settings.model_copy(update={"console_signin_max_failures": LIMIT})
    with RegistryServer(settings) as server:
        consoles = [console_at(server.url, None) for _ in range(BURST)]
        statuses = _burst(consoles, [f"cfr_wrong-{i}" for i in range(BURST)])
        for console in consoles:
            console.http.close()
        assert statuses == Counter({401: LIMIT, 429: BURST - LIMIT}), statuses
        assert _checked(server) == LIMIT


def test_a_burst_split_over_two_registries_of_one_database_is_limited_once(
    registry_settings: RegistrySettings, console_at: ConsoleAt
) -> None:
    settings = registry_settings.model_copy(update={"console_signin_max_failures": LIMIT})
    with RegistryServer(settings) as first, RegistryServer(settings) as second:
        consoles = [console_at((first, second)[i % 2].url, None) for i in range(BURST)]
        statuses = _burst(consoles, [f"cfr_wrong-{i}" for i in range(BURST)])
        for console in consoles:
            console.http.close()
        assert statuses == Counter({401: LIMIT, 429: BURST - LIMIT}), statuses
        assert _checked(first) + _checked(second) == LIMIT


def test_good_sign_ins_do_not_use_up_the_allowance(
    registry_settings: RegistrySettings, console_at: ConsoleAt
) -> None:
    settings = registry_settings.model_copy(update={"console_signin_max_failures": 3})
    with RegistryServer(settings) as server:
        token = make_token(server)
        consoles = [console_at(server.url, None) for _ in range(6)]
        # One after another: a sign-in holds a slot only while its token is checked (a burst
        # of good ones from one address may meet the limit for that moment; by design).
        assert [console.sign_in(token).status_code for console in consoles] == [303] * 6
        wrong = [console_at(server.url, None) for _ in range(3)]
        assert _burst(wrong, ["cfr_wrong"] * 3) == Counter({401: 3})
        late = console_at(server.url, None)
        assert late.sign_in(token).status_code == 429  # the window is full of failures now
        for console in [*consoles, *wrong, late]:
            console.http.close()


def test_a_burst_with_the_right_token_among_wrong_ones_checks_at_most_the_limit(
    registry_settings: RegistrySettings, console_at: ConsoleAt
) -> None:
    settings = registry_settings.model_copy(update={"console_signin_max_failures": LIMIT})
    with RegistryServer(settings) as server:
        token = make_token(server)
        consoles = [console_at(server.url, None) for _ in range(BURST)]
        tokens = [token if i % 10 == 0 else f"cfr_wrong-{i}" for i in range(BURST)]
        statuses = _burst(consoles, tokens)
        for console in consoles:
            console.http.close()
        # Every answer is a sign-in, a refusal of a checked token, or the rate limit; and the
        # checked wrong tokens never exceed the limit, whatever the interleaving.
        assert set(statuses) <= {303, 401, 429}, statuses
        assert statuses[401] <= LIMIT and statuses[401] + statuses[303] <= LIMIT + 3
        assert statuses[429] >= BURST - LIMIT - 3


def test_rate_limited_answer_is_a_page_with_retry_after(
    registry_settings: RegistrySettings, console_at: ConsoleAt
) -> None:
    settings = registry_settings.model_copy(update={"console_signin_max_failures": 1})
    with RegistryServer(settings) as server:
        console = console_at(server.url, None)
        assert console.sign_in("cfr_wrong").status_code == 401
        limited = console.sign_in("cfr_wrong")
        assert limited.status_code == 429
        assert limited.headers["content-type"].startswith("text/html")
        assert 1 <= int(limited.headers["retry-after"]) <= 300
        console.http.close()
