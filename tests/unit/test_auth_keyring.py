"""The key ring: who a key belongs to, rotation by `replace`, credentials toward replicas, and
a comparison whose time does not depend on how much of a wrong key matches."""

from __future__ import annotations

import gc
import secrets
import statistics
import time
from pathlib import Path

import pytest
from multidict import CIMultiDict

from proxy.config import ApiKey, AuthConfig, ConfigError, ReplicaConfig
from proxy.core.errors import Unauthorized
from proxy.edge.auth import KeyRing, presented_key

A = "ka-" + "a" * 29
B = "kb-" + "b" * 29


def ring(*keys: ApiKey, **auth: object) -> KeyRing:
    return KeyRing(AuthConfig(api_keys=keys, **auth))  # type: ignore[arg-type]


def test_lookup_names_the_tenant_of_every_key() -> None:
    r = ring(ApiKey("team-a", A), ApiKey("team-b", B), ApiKey("team-a", A + "-next"))
    assert (r.lookup(A), r.lookup(B), r.lookup(A + "-next")) == ("team-a", "team-b", "team-a")
    assert r.lookup(A[:-1]) is None and r.lookup(A + "x") is None and r.lookup("") is None
    assert r.enabled and repr(r) == "<KeyRing 3 keys, tenants: team-a, team-b>"


def test_off_without_keys() -> None:
    r = KeyRing(AuthConfig())
    assert not r.enabled
    assert r.authorize(CIMultiDict()) is None  # anyone, as before auth existed


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"Authorization": f"Bearer {A}"}, A),
        ({"Authorization": f"bearer   {A} "}, A),
        ({"x-api-key": A}, A),
        ({"Authorization": f"Bearer {A}", "x-api-key": B}, A),  # Authorization first
        ({"Authorization": "Basic dXNlcjpwdw==", "x-api-key": B}, B),
        ({"Authorization": "Basic dXNlcjpwdw=="}, None),
        ({"Authorization": "Bearer "}, None),
        ({}, None),
    ],
)
def test_presented_key(headers: dict[str, str], key: str | None) -> None:
    assert presented_key(CIMultiDict(headers)) == key


def test_authorize_missing_and_wrong_keys_never_echo_the_key() -> None:
    r = ring(ApiKey("team-a", A))
    assert r.authorize(CIMultiDict({"Authorization": f"Bearer {A}"})) == "team-a"
    with pytest.raises(Unauthorized) as missing:
        r.authorize(CIMultiDict())
    assert missing.value.status == 401 and missing.value.code == "invalid_api_key"
    assert missing.value.type == "invalid_request_error" and missing.value.reason == "unauthorized"
    assert "missing API key" in missing.value.message
    wrong = A[:-1] + "Z"
    with pytest.raises(Unauthorized) as caught:
        r.authorize(CIMultiDict({"x-api-key": wrong}))
    assert "invalid API key" in caught.value.message
    assert wrong not in str(caught.value) and A not in str(caught.value)


def test_replace_rotates_keys_and_rereads_the_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"team-b:{B}\n")
    r = ring(ApiKey("team-a", A), api_keys_file=str(keys))
    assert r.lookup(A) == "team-a" and r.lookup(B) == "team-b"
    keys.write_text(f"team-b:{B}-2\n")  # rotated in the file: the old key goes at once
    r.replace(AuthConfig(api_keys=(ApiKey("team-a", A + "-2"),), api_keys_file=str(keys)))
    assert r.lookup(A) is None and r.lookup(B) is None
    assert r.lookup(A + "-2") == "team-a" and r.lookup(B + "-2") == "team-b"
    r.replace(AuthConfig())
    assert not r.enabled


def test_a_bad_keys_file_on_replace_keeps_the_keys_in_force(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"team-b:{B}\n")
    r = ring(api_keys_file=str(keys))
    keys.write_text(f"team-b {B}-2\n")
    with pytest.raises(ConfigError) as caught:
        r.replace(AuthConfig(api_keys_file=str(keys)))
    assert str(caught.value) == f"auth.api_keys_file: {keys} line 1: expected name:key"
    assert B not in str(caught.value)
    assert r.lookup(B) == "team-b"


def replica(name: str, api_key: str | None = None) -> ReplicaConfig:
    return ReplicaConfig(name=name, max_concurrency=1, url="http://h:1", api_key=api_key)


CALLER = [("Authorization", f"Bearer {A}"), ("X-API-Key", A), ("Accept", "*/*")]


def test_upstream_credentials() -> None:
    # No auth and no upstream key: the caller's headers go as they came.
    off = KeyRing(AuthConfig(), [replica("r")])
    assert off.upstream_headers("r", CALLER) is CALLER
    # Caller auth on, no upstream key: the caller's key never goes to a replica.
    on = KeyRing(AuthConfig(api_keys=(ApiKey("team-a", A),)), [replica("r")])
    assert on.upstream_headers("r", CALLER) == [("Accept", "*/*")]
    # An upstream key replaces the caller's; a replica's own api_key wins over it.
    keyed = KeyRing(AuthConfig(upstream_api_key="up-0"), [replica("r"), replica("s", "up-s")])
    assert keyed.upstream_headers("r", CALLER) == [("Accept", "*/*"),
                                                   ("Authorization", "Bearer up-0")]
    assert keyed.upstream_headers("s", CALLER) == [("Accept", "*/*"),
                                                   ("Authorization", "Bearer up-s")]
    # replace() with replicas rebuilds the per-replica keys; without, keeps them.
    keyed.replace(AuthConfig(upstream_api_key="up-1"))
    assert keyed.upstream_headers("s", CALLER)[-1] == ("Authorization", "Bearer up-s")
    assert keyed.upstream_headers("r", CALLER)[-1] == ("Authorization", "Bearer up-1")
    keyed.replace(AuthConfig(), [replica("r"), replica("s")])
    assert keyed.upstream_headers("s", CALLER) is CALLER
    assert "up-" not in repr(keyed)


def test_every_key_is_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: a guess costs as many comparisons as there are keys, so the time of a
    match says nothing about where in the list its key is."""
    import proxy.edge.auth as auth

    keys = [ApiKey(f"t{i}", f"key-{i:04d}-" + "k" * 20) for i in range(5)]
    r = ring(*keys)
    calls: list[int] = []
    real = auth.hmac.compare_digest

    def counted(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counted)
    for guess, tenant in [(keys[0].key, "t0"), (keys[4].key, "t4"), ("nope", None)]:
        calls.clear()
        assert r.lookup(guess) == tenant
        assert len(calls) == len(keys), guess


# --- timing ----------------------------------------------------------------------------------

#: Long keys make any length-dependent comparison (``==``, a loop that stops at the first
#: differing character) cost microseconds more for a guess that matches further, far above
#: the noise; a digest comparison costs the same for every guess of the same length.
KEY_LENGTH = 4096
ROUNDS = 4000


def _median_ns(lookup: object, guesses: list[str]) -> tuple[float, float]:
    """Median time of one lookup of a near guess and of a far guess, measured interleaved
    (so load on the machine falls on both alike) after a warm-up."""
    near_guess, far_guess = guesses
    near: list[int] = []
    far: list[int] = []
    clock = time.perf_counter_ns
    call = lookup  # type: ignore[assignment]
    for _ in range(200):
        call(near_guess), call(far_guess)  # type: ignore[operator]
    for i in range(ROUNDS):
        # Alternate which goes first: nothing systematic favours either.
        first, second, first_out, second_out = (
            (near_guess, far_guess, near, far) if i % 2 else (far_guess, near_guess, far, near))
        t0 = clock()
        call(first)  # type: ignore[operator]
        t1 = clock()
        call(second)  # type: ignore[operator]
        t2 = clock()
        first_out.append(t1 - t0)
        second_out.append(t2 - t1)
    return statistics.median(near), statistics.median(far)


def timing_gap(lookup: object, key: str) -> float:
    """How much longer (as a share of the far guess's time) a wrong guess that matches all
    but the last character takes than one that matches nothing: the medians of many
    interleaved runs, a statistic robust to the odd preempted run."""
    near_guess = key[:-1] + ("0" if key[-1] != "0" else "1")
    far_guess = ("0" if key[0] != "0" else "1") * len(key)
    gc.disable()
    try:
        near, far = _median_ns(lookup, [near_guess, far_guess])
    finally:
        gc.enable()
    return (near - far) / far


def test_a_wrong_key_takes_as_long_however_much_of_it_matches() -> None:
    key = secrets.token_hex(KEY_LENGTH // 2)
    r = ring(ApiKey("team-a", key), ApiKey("team-b", secrets.token_hex(KEY_LENGTH // 2)))
    assert r.lookup(key) == "team-a"
    gap = timing_gap(r.lookup, key)
    # A digest comparison: the two medians agree within noise. Plain `==` on these keys makes
    # the near guess several times slower (checked by hand by swapping it in; see
    # test_the_timing_check_catches_a_plain_comparison).
    assert abs(gap) < 0.05, f"near guess {gap:+.1%} slower than a far one"


def test_the_timing_check_catches_a_plain_comparison() -> None:
    """The statistic is sensitive enough: a character-by-character comparison fails it."""
    key = secrets.token_hex(KEY_LENGTH // 2)
    keys = [key, secrets.token_hex(KEY_LENGTH // 2)]

    def naive(presented: str) -> str | None:
        found = None
        for known in keys:
            if presented == known:
                found = known
        return found

    assert timing_gap(naive, key) > 0.05
