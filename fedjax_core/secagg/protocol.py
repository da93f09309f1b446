"""SecAgg+ (Bell et al. 2020, after Bonawitz et al. 2017) as two pure state machines: :class:`Client` (an envoy's
worker) and :class:`Server` (the director, which relays and sums but never holds one client's vector in the clear).

A round's participants are placed on a ring in an order drawn from the round's public seed; each has the
``degree`` nearest of them as neighbours (a Harary graph: the cost grows with the neighbourhood, not with n^2).

1. advertise: each client makes two X25519 key pairs, one to encrypt shares and one to agree masks, and
   sends both public keys; the server hands each client its neighbours' keys.
2. share: each client draws a self-mask seed ``b`` and Shamir-shares ``b`` and its mask private key among
   its neighbours (any ``threshold`` shares rebuild one), each share encrypted to its neighbour
   (AES-GCM under their X25519 agreement); the server routes the ciphertexts it cannot read.
3. mask: each client quantises its vector into the ring Z_(2^bits) and adds its self mask PRG(b) and, for
   every neighbour whose shares reached it, +-PRG(pairwise seed); the server adds the masked vectors
   into one running sum and keeps nothing else of them.
4. unmask: each surviving client tells the server, per neighbour, a share of ``b`` (the neighbour's
   masked vector arrived) or of its mask private key (it did not), never both; the server rebuilds
   the self masks of the survivors and the pairwise masks the dropped ones left, and removes them.

What comes out is the sum of the survivors' vectors, dequantised. A client that drops after sharing
is recovered from its neighbours' shares; when some secret has fewer than ``threshold`` shares left,
:meth:`Server.result` raises :class:`SecAggError` naming it.
"""
from __future__ import annotations

import dataclasses
import math
import random
import struct
from collections.abc import Collection, Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag

from fedjax_core.secagg import crypto, shamir


MASKED_TENSOR = "secagg/masked"  # the name a masked vector travels under in an UploadUpdate stream


class SecAggError(RuntimeError):
    """The round cannot be unmasked (too few shares of some secret), or a party broke the protocol."""


@dataclasses.dataclass(frozen=True)
class RoundSetup:
    """One round's public parameters, which the server and every client derive alike."""

    context: str  # experiment/round: binds keys, ciphertexts and masks to this round
    participants: tuple[str, ...]  # sorted
    neighbours: Mapping[str, tuple[str, ...]]
    threshold: int  # shares that rebuild a neighbour's secret
    bits: int  # the ring is Z_(2^bits)
    clip_range: float  # vector entries are clipped to [-clip_range, clip_range] before quantisation
    size: int  # entries in each client's vector

    @property
    def levels(self) -> int:
        """Quantisation levels: ``n`` quantised vectors add up without wrapping around the ring."""
        return ((1 << self.bits) - 1) // len(self.participants)

    @property
    def step(self) -> float:
        """The quantisation step: one client's rounding error per entry is below it."""
        return 2 * self.clip_range / self.levels

    def point(self, name: str) -> int:
        """The Shamir evaluation point of ``name``."""
        return self.participants.index(name) + 1


def degree(n: int) -> int:
    """Neighbours per participant: every other one up to 8 participants, then 2 * ceil(1.5 log2 n) (even)."""
    if n <= 9:
        return n - 1
    return min(n - 1, 2 * math.ceil(1.5 * math.log2(n)))


def setup(context: str, participants: Sequence[str], threshold: float, bits: int, clip_range: float, size: int,
          seed: int) -> RoundSetup:
    """The round's neighbour graph (from the public ``seed``) and Shamir threshold (``threshold`` of the neighbours,
    more than half of them when ``threshold`` >= 0.5)."""
    names = tuple(sorted(participants))
    n = len(names)
    if n < 2:
        raise SecAggError("secure aggregation needs at least 2 participants in a round")
    ring = list(names)
    random.Random(f"{context}/{seed}").shuffle(ring)
    d = degree(n)
    at = {name: i for i, name in enumerate(ring)}
    neighbours = {}
    for name in names:
        i = at[name]
        if d == n - 1:
            chosen = [m for m in names if m != name]
        else:
            chosen = [ring[(i + k) % n] for k in range(-(d // 2), d // 2 + 1) if k]
        neighbours[name] = tuple(sorted(chosen))
    t = min(d, math.floor(threshold * d) + 1)
    return RoundSetup(context, names, neighbours, t, bits, clip_range, size)


def quantise(vector: np.ndarray, s: RoundSetup, rng: np.random.Generator) -> np.ndarray:
    """Entries clipped to [-c, c] and stochastically rounded to {0 .. levels}: unbiased, error below ``step``."""
    scaled = (np.clip(vector, -s.clip_range, s.clip_range) + s.clip_range) / s.step
    return np.minimum(np.floor(scaled + rng.random(scaled.shape)), s.levels).astype(np.uint64)


def dequantise(total: np.ndarray, s: RoundSetup, count: int) -> np.ndarray:
    """The sum of ``count`` clients' vectors from the sum of their quantised vectors."""
    return total.astype(np.float64) * s.step - count * s.clip_range


def _pair_context(s: RoundSetup, a: str, b: str, purpose: str) -> bytes:
    low, high = sorted((a, b))
    return f"fedjax-secagg/{purpose}/{s.context}/{low}/{high}".encode()


def _pack(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _unpack(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack_from(">I", data, i)
        out.append(data[i + 4:i + 4 + n])
        i += 4 + n
    return out


def _mask_mod(s: RoundSetup) -> np.uint64:
    return np.uint64((1 << s.bits) - 1)


class Client:
    """One participant's side of one round. Its secrets never leave it except as encrypted shares."""

    def __init__(self, name: str, s: RoundSetup):
        if name not in s.participants:
            raise SecAggError(f"{name!r} is not a participant of {s.context}")
        self.name, self.setup = name, s
        self._cipher_key, self._mask_key = crypto.new_key(), crypto.new_key()
        self._self_seed = crypto.new_seed()
        self._keys: dict[str, tuple[bytes, bytes]] = {}
        self._held: dict[str, tuple[bytes, bytes]] = {}  # neighbour -> (share of its b, share of its mask key)
        self._revealed = False

    def advertise(self) -> tuple[bytes, bytes]:
        """(encryption public key, mask public key)."""
        return crypto.public_bytes(self._cipher_key), crypto.public_bytes(self._mask_key)

    def share(self, keys: Mapping[str, tuple[bytes, bytes]]) -> dict[str, bytes]:
        """The encrypted shares for each neighbour whose keys the server relayed: neighbour -> ciphertext."""
        s = self.setup
        unknown = set(keys) - set(s.neighbours[self.name])
        if unknown:
            raise SecAggError(f"the server relayed keys of {sorted(unknown)}, who are not {self.name!r}'s neighbours")
        if len(keys) < s.threshold:
            raise SecAggError(f"only {len(keys)} neighbours of {self.name!r} advertised keys; {s.threshold} are needed")
        self._keys = dict(keys)
        points = {name: s.point(name) for name in keys}
        b_shares = shamir.split(self._self_seed, s.threshold, points.values())
        k_shares = shamir.split(crypto.private_bytes(self._mask_key), s.threshold, points.values())
        out = {}
        for name, (cipher_pk, _) in keys.items():
            key = crypto.agree(self._cipher_key, cipher_pk, _pair_context(s, self.name, name, "share"))
            plain = _pack(self.name.encode(), name.encode(), b_shares[points[name]], k_shares[points[name]])
            out[name] = crypto.encrypt(key, plain, f"{s.context}/{self.name}->{name}".encode())
        return out

    def mask(self, vector: np.ndarray, incoming: Mapping[str, bytes],
             rng: np.random.Generator | None = None) -> np.ndarray:
        """The masked, quantised ``vector`` (uint64 in Z_(2^bits)); ``incoming``: neighbour -> the ciphertext it sent."""
        s = self.setup
        if vector.shape != (s.size,):
            raise SecAggError(f"{self.name!r}'s vector has shape {vector.shape}, the round's is ({s.size},)")
        for sender, ciphertext in incoming.items():
            if sender not in self._keys:
                raise SecAggError(f"{self.name!r} got shares from {sender!r}, whose keys it never saw")
            key = crypto.agree(self._cipher_key, self._keys[sender][0], _pair_context(s, self.name, sender, "share"))
            try:
                fields = _unpack(crypto.decrypt(key, ciphertext, f"{s.context}/{sender}->{self.name}".encode()))
            except InvalidTag:
                raise SecAggError(f"the shares {sender!r} sent {self.name!r} do not decrypt: altered on the way") from None
            if fields[:2] != [sender.encode(), self.name.encode()]:
                raise SecAggError(f"the shares {sender!r} sent {self.name!r} name other parties")
            self._held[sender] = (fields[2], fields[3])
        masked = quantise(np.asarray(vector, np.float64), s, rng or np.random.default_rng())
        masked += crypto.prg(self._self_seed, s.size)
        for other in self._held:  # a neighbour whose shares reached us masks with us too
            seed = crypto.agree(self._mask_key, self._keys[other][1], _pair_context(s, self.name, other, "mask"))
            pad = crypto.prg(seed, s.size)
            if self.name < other:
                masked += pad
            else:
                masked -= pad
        return masked & _mask_mod(s)

    def reveal(self, survivors: Collection[str], dropped: Collection[str]) -> dict[str, bytes]:
        """Per neighbour whose shares it holds: the share of its self-mask seed when it survived, of its mask key
        when it dropped; never both for one neighbour, and only once per round."""
        if self._revealed:
            raise SecAggError(f"{self.name!r} already revealed its shares for {self.setup.context}")
        survivors, dropped = set(survivors), set(dropped)
        if survivors & dropped:
            raise SecAggError(f"the server calls {sorted(survivors & dropped)} both survivors and dropped")
        if len(survivors) < self.setup.threshold:
            raise SecAggError(f"only {len(survivors)} survivors; revealing shares needs {self.setup.threshold}")
        self._revealed = True
        out = {}
        for name, (b_share, key_share) in self._held.items():
            if name in survivors:
                out[name] = b"b" + b_share
            elif name in dropped:
                out[name] = b"k" + key_share
        return out


class Server:
    """The director's side of one round: it relays keys and ciphertexts, sums masked vectors as they arrive
    (keeping none of them), and unmasks the sum from the revealed shares."""

    def __init__(self, s: RoundSetup):
        self.setup = s
        self.keys: dict[str, tuple[bytes, bytes]] = {}
        self._shares: dict[str, dict[str, bytes]] = {}  # receiver -> sender -> ciphertext
        self.shared: set[str] = set()
        self._sum = np.zeros(s.size, np.uint64)
        self.masked: set[str] = set()
        self._revealed: dict[str, dict[str, bytes]] = {}  # revealer -> about -> tagged share
        self._about: dict[str, dict[int, bytes]] = {}  # whose secret -> share point -> tagged share

    def add_keys(self, name: str, cipher_pk: bytes, mask_pk: bytes) -> None:
        self._member(name)
        if len(cipher_pk) != 32 or len(mask_pk) != 32:
            raise SecAggError(f"{name!r}'s public keys must be 32 bytes each (X25519)")
        for key in (cipher_pk, mask_pk):
            if not crypto.usable_public_key(key):
                raise SecAggError(f"{name!r} sent an X25519 public key of low order, which no one can agree a secret "
                                  "with")
        self.keys[name] = (cipher_pk, mask_pk)

    def keys_for(self, name: str) -> dict[str, tuple[bytes, bytes]]:
        return {n: self.keys[n] for n in self.setup.neighbours[name] if n in self.keys}

    def add_shares(self, name: str, ciphertexts: Mapping[str, bytes]) -> None:
        self._member(name)
        if name not in self.keys:
            raise SecAggError(f"{name!r} sends shares but advertised no keys")
        expected = set(self.keys_for(name))
        if set(ciphertexts) != expected:  # one-sided pairwise masks would leave the sum garbage
            raise SecAggError(f"{name!r} must send shares to each neighbour that advertised keys, exactly: missing "
                              f"{sorted(expected - set(ciphertexts))[:5]}, unexpected "
                              f"{sorted(set(ciphertexts) - expected)[:5]}")
        for receiver, ciphertext in ciphertexts.items():
            self._shares.setdefault(receiver, {})[name] = ciphertext
        self.shared.add(name)

    def shares_for(self, name: str) -> dict[str, bytes]:
        """The ciphertexts neighbours that completed sharing sent ``name``."""
        return {sender: ct for sender, ct in self._shares.get(name, {}).items() if sender in self.shared}

    def add_masked(self, name: str, masked: np.ndarray) -> None:
        s = self.setup
        self._member(name)
        if name not in self.shared or name in self.masked:
            raise SecAggError(f"{name!r} sends a masked vector out of turn")
        masked = np.asarray(masked)
        if masked.dtype != np.uint64 or masked.shape != (s.size,) or (masked > _mask_mod(s)).any():
            raise SecAggError(f"{name!r}'s masked vector must be {s.size} uint64 values below 2^{s.bits}")
        self._sum += masked
        self._sum &= _mask_mod(s)
        self.masked.add(name)

    def unmask_request(self, name: str) -> tuple[list[str], list[str]]:
        """(survivors, dropped) among the neighbours whose shares ``name`` holds."""
        held = self.shares_for(name)
        return sorted(n for n in held if n in self.masked), sorted(n for n in held if n not in self.masked)

    def add_reveal(self, name: str, shares: Mapping[str, bytes]) -> None:
        self._member(name)
        if name not in self.masked:
            raise SecAggError(f"{name!r} reveals shares but sent no masked vector")
        survivors, dropped = self.unmask_request(name)
        for about, tagged in shares.items():
            want = b"b" if about in survivors else b"k" if about in dropped else None
            if want is None or tagged[:1] != want:
                raise SecAggError(f"{name!r} revealed a share about {about!r} it was not asked for")
        self._revealed[name] = dict(shares)
        point = self.setup.point(name)
        for about, tagged in shares.items():
            self._about.setdefault(about, {})[point] = tagged

    def result(self) -> tuple[np.ndarray, tuple[str, ...]]:
        """(the sum of the survivors' vectors, the survivors); SecAggError when some secret cannot be rebuilt."""
        s = self.setup
        total = self._sum.copy()
        survivors = sorted(self.masked)
        if not survivors:
            raise SecAggError("no participant sent a masked vector")
        for name in survivors:
            seed = self._rebuild(name, b"b")
            total -= crypto.prg(seed, s.size)
        masked = set(survivors)
        for gone in sorted(self.shared - self.masked):
            mask_key = self._rebuild(gone, b"k")
            for other in self.setup.neighbours[gone]:
                if other in masked and gone in self._shares.get(other, {}):  # ``other`` masked with ``gone``
                    seed = crypto.agree(mask_key, self.keys[other][1], _pair_context(s, other, gone, "mask"))
                    pad = crypto.prg(seed, s.size)
                    if other < gone:
                        total -= pad
                    else:
                        total += pad
        total &= _mask_mod(s)
        return dequantise(total, s, len(survivors)), tuple(survivors)

    def _rebuild(self, about: str, tag: bytes) -> bytes:
        shares = {point: tagged[1:] for point, tagged in self._about.get(about, {}).items() if tagged[:1] == tag}
        what = "self-mask seed" if tag == b"b" else "mask key"
        if len(shares) < self.setup.threshold:
            raise SecAggError(f"the {what} of {about!r} cannot be rebuilt: {len(shares)} of its neighbours revealed "
                              f"shares, {self.setup.threshold} are needed")
        try:
            return shamir.combine(shares, self.setup.threshold)
        except shamir.ShamirError as exc:
            raise SecAggError(f"the {what} of {about!r}: {exc}") from None

    def _member(self, name: str) -> None:
        if name not in self.setup.participants:
            raise SecAggError(f"{name!r} is not a participant of {self.setup.context}")
