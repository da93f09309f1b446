"""SecAgg+ as pure state machines: the unmasked sum against numpy with dropouts at each step, what the server
can and cannot rebuild, and the checks against a server or client that breaks the protocol."""
from __future__ import annotations

import numpy as np
import pytest

from fedjax_core.secagg import crypto, protocol, shamir
from fedjax_core.secagg.protocol import Client, SecAggError, Server


def names(n):
    return [f"e{i:02d}" for i in range(n)]


def play(n, size=500, threshold=0.5, bits=32, clip=1.0, before_share=(), after_share=(), after_mask=(), seed=3):
    """One round; returns (the server's sum, survivors, the clients' vectors, setup)."""
    s = protocol.setup("exp/0", names(n), threshold, bits, clip, size, seed)
    clients = {m: Client(m, s) for m in names(n)}
    server = Server(s)
    for m, c in clients.items():
        server.add_keys(m, *c.advertise())
    for m, c in clients.items():
        if m not in before_share:
            server.add_shares(m, c.share(server.keys_for(m)))
    rng = np.random.default_rng(0)
    vectors = {m: rng.uniform(-clip, clip, size) for m in names(n)}
    for m, c in clients.items():
        if m in server.shared and m not in after_share:
            server.add_masked(m, c.mask(vectors[m], server.shares_for(m)))
    for m in sorted(server.masked):
        if m not in after_mask:
            server.add_reveal(m, clients[m].reveal(*server.unmask_request(m)))
    total, survivors = server.result()
    return total, survivors, vectors, s


@pytest.mark.parametrize("n, drops", [(5, {}), (5, {"after_share": ("e01",)}), (5, {"before_share": ("e02",)}),
                                      (5, {"after_mask": ("e04",)}), (16, {"after_share": ("e03", "e09")}),
                                      (40, {"after_share": ("e00",), "before_share": ("e07",)})])
def test_the_unmasked_sum_is_the_survivors_sum_within_the_quantisation_error(n, drops):
    total, survivors, vectors, s = play(n, **drops)
    gone = set(drops.get("after_share", ())) | set(drops.get("before_share", ()))
    assert set(survivors) == set(names(n)) - gone
    want = sum(vectors[m] for m in survivors)
    assert np.abs(total - want).max() < len(survivors) * s.step  # each client's stochastic rounding is below a step


def test_the_masked_vectors_look_nothing_like_the_inputs_and_the_graph_is_sparse():
    s = protocol.setup("exp/0", names(64), 0.5, 32, 1.0, 1000, 1)
    assert protocol.degree(64) == len(s.neighbours["e00"]) < 63  # SecAgg+: O(log n) neighbours, not everyone
    assert all(a in s.neighbours[b] for a in s.participants for b in s.neighbours[a])  # symmetric
    masked = Client("e00", s).mask(np.zeros(1000), {})
    assert np.unique(masked).size > 990  # the self mask alone makes zeros look uniform in the ring


def test_too_few_survivors_cannot_be_unmasked_and_say_whose_secret_is_missing():
    with pytest.raises(SecAggError, match=r"only 2 survivors; revealing shares needs 3"):
        play(5, after_share=("e01", "e02"))
    s = protocol.setup("exp/0", names(5), 0.5, 32, 1.0, 10, 3)
    clients = {m: Client(m, s) for m in names(5)}
    server = Server(s)
    for m, c in clients.items():
        server.add_keys(m, *c.advertise())
    for m, c in clients.items():
        server.add_shares(m, c.share(server.keys_for(m)))
    for m, c in clients.items():
        server.add_masked(m, c.mask(np.zeros(10), server.shares_for(m)))
    for m in ("e00", "e01"):  # only two reveal: no self-mask seed can be rebuilt
        server.add_reveal(m, clients[m].reveal(*server.unmask_request(m)))
    with pytest.raises(SecAggError, match=r"self-mask seed of 'e0\d' cannot be rebuilt: [12] of its neighbours"):
        server.result()


def test_a_client_never_reveals_both_secrets_of_one_neighbour_nor_twice():
    s = protocol.setup("exp/0", names(5), 0.5, 32, 1.0, 10, 3)
    c = Client("e00", s)
    with pytest.raises(SecAggError, match="both survivors and dropped"):
        c.reveal(["e01", "e02", "e03"], ["e01"])
    c.reveal(["e01", "e02", "e03"], ["e04"])
    with pytest.raises(SecAggError, match="already revealed"):
        c.reveal(["e01", "e02", "e03"], [])


def test_the_server_refuses_what_breaks_the_protocol():
    s = protocol.setup("exp/0", names(5), 0.5, 32, 1.0, 10, 3)
    server = Server(s)
    with pytest.raises(SecAggError, match="'mallory' is not a participant"):
        server.add_keys("mallory", b"x" * 32, b"y" * 32)
    with pytest.raises(SecAggError, match="32 bytes"):
        server.add_keys("e00", b"x", b"y" * 32)
    with pytest.raises(SecAggError, match="out of turn"):
        server.add_masked("e00", np.zeros(10, np.uint64))
    clients = {m: Client(m, s) for m in names(5)}
    for m, c in clients.items():
        server.add_keys(m, *c.advertise())
    shares = clients["e00"].share(server.keys_for("e00"))
    with pytest.raises(SecAggError, match=r"unexpected \[.e09.\]"):
        server.add_shares("e00", {**shares, "e09": b"z"})
    server.add_shares("e00", shares)
    with pytest.raises(SecAggError, match="uint64 values below 2\\^32"):
        server.add_masked("e00", np.full(10, 2 ** 40, np.uint64))


def test_shares_altered_by_the_relay_do_not_decrypt():
    s = protocol.setup("exp/0", names(3), 0.5, 32, 1.0, 4, 3)
    a, b = Client("e00", s), Client("e01", s)
    keys = {"e00": a.advertise(), "e01": b.advertise(), "e02": Client("e02", s).advertise()}
    b.share({k: v for k, v in keys.items() if k != "e01"})
    to_b = a.share({k: v for k, v in keys.items() if k != "e00"})["e01"]
    tampered = to_b[:-1] + bytes([to_b[-1] ^ 1])
    with pytest.raises(SecAggError, match="do not decrypt: altered on the way"):
        b.mask(np.zeros(4), {"e00": tampered})


def test_shamir_rebuilds_from_any_threshold_shares_and_not_from_fewer():
    secret = crypto.new_seed()
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    assert shamir.combine({x: shares[x] for x in (2, 4, 5)}, 3) == secret
    assert shamir.combine({x: shares[x] for x in (1, 3, 5)}, 3) == secret
    with pytest.raises(shamir.ShamirError, match="2 shares cannot rebuild"):
        shamir.combine({x: shares[x] for x in (1, 2)}, 3)
    with pytest.raises(shamir.ShamirError, match="do not belong to one secret"):  # a share at the wrong point
        shamir.combine({1: shares[1], 2: shares[2], 3: shares[4]}, 3)


def test_quantisation_is_unbiased_and_clips_to_the_range():
    s = protocol.setup("exp/0", names(4), 0.5, 16, 0.25, 100_000, 3)
    rng = np.random.default_rng(1)
    v = np.full(100_000, 0.1234567)
    q = protocol.quantise(v, s, rng)
    back = protocol.dequantise(q, s, 1)
    assert abs(back.mean() - 0.1234567) < 3 * s.step / np.sqrt(100_000)  # unbiased below the step
    assert np.abs(back - v).max() < s.step
    assert protocol.dequantise(protocol.quantise(np.array([9.0, -9.0]), s, rng), s, 1) == pytest.approx([0.25, -0.25])


def test_the_server_refuses_low_order_keys_and_partial_or_keyless_shares():
    s = protocol.setup("exp/0", names(5), 0.5, 32, 1.0, 10, 3)
    server = Server(s)
    with pytest.raises(SecAggError, match="low order"):
        server.add_keys("e00", bytes(32), bytes(32))  # the identity point: every agreement with it is zero
    clients = {m: Client(m, s) for m in names(5)}
    with pytest.raises(SecAggError, match="advertised no keys"):
        server.add_shares("e00", {})
    for m, c in clients.items():
        server.add_keys(m, *c.advertise())
    shares = clients["e00"].share(server.keys_for("e00"))
    with pytest.raises(SecAggError, match=r"each neighbour that advertised keys, exactly: missing \['e01'\]"):
        server.add_shares("e00", {k: v for k, v in shares.items() if k != "e01"})
