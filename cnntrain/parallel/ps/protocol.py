"""Op codes of the requests a ps answers, the status codes of its replies, and the HELLO proof.

Request (client -> ps)        numbers                                      tensors
HELLO                         role, index, fingerprint, #workers, #ps, ps, -
                              proof (PROOF_WORDS 32-bit words)
INIT (chief)                  step, classes, C, H, W, steps/epoch, total,  params f32, buffers f64, optimizer
                              base lr, run stamp, optimizer-state mask     state f32 (one per key in the mask)
PULL (chief, workers)         wait for --max-staleness admission (0/1)     -
PUSH (chief, workers)         pulled version, leave the admitted set,      gradient f32 (empty: step skipped),
                              then pull, wait for admission                buffers f64 (empty: none)
STATS, PING, BYE (anyone)     -                                            -
SNAPSHOT, FINISH (chief)      -                                            -
ABORT (chief)                 role, index of the process that failed       -
SCORED (evaluator)            step of the checkpoint it scored             -

Reply status in the op field: CHALLENGE (the ps's first frame on every link: NONCE_WORDS random
32-bit words), OK, DONE (training is over), FAILED (role, index, cause: the job is ending), RETRY
(ask again), REFUSED (reason code, then details; the ps closes the link after it).

The proof is HMAC-SHA256 under the job's token of the nonce and the HELLO's identity numbers, so a
process that does not hold the token cannot join, and a HELLO seen on the wire is worth nothing on
another link. A job where no role has a token uses ``PUBLIC_TOKEN``: the config digest is still
checked, but anyone who can reach the ps can join (the ps says so when it starts).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct

from cnntrain.parallel.ps.cluster import CHIEF, EVALUATOR, WORKER

HELLO, INIT, PULL, PUSH, STATS, SNAPSHOT, FINISH, ABORT, PING, SCORED, BYE = range(1, 12)
OK, DONE, FAILED, RETRY, REFUSED, CHALLENGE = range(6)
REQUEST_NAMES = {HELLO: "HELLO", INIT: "INIT", PULL: "PULL", PUSH: "PUSH", STATS: "STATS", SNAPSHOT: "SNAPSHOT",
                 FINISH: "FINISH", ABORT: "ABORT", PING: "PING", SCORED: "SCORED", BYE: "BYE"}

# FAILED causes
LOST, REPORTED, NEVER_CONNECTED, NOT_INITIALISED = range(4)
# REFUSED reasons (BAD_MESSAGE carries one of the PROBLEMS below as its detail)
BAD_CONFIG, BAD_CLUSTER, DUPLICATE, WRONG_PS, BAD_TOKEN, BAD_MESSAGE, BUSY = range(7)
PROBLEMS = ("malformed message", "request not allowed for this role", "wrong number of values",
            "wrong tensor count, type or length", "non-finite or out-of-range values", "index out of range",
            "unknown request")
MALFORMED, NOT_ALLOWED, BAD_NUMBERS, BAD_TENSORS, NOT_FINITE, BAD_INDEX, UNKNOWN_OP = range(len(PROBLEMS))

_ANYONE, _TRAINERS = (CHIEF, WORKER, EVALUATOR), (CHIEF, WORKER)
# Who may send each request, and how many numbers it carries.
RULES = {PING: (_ANYONE, 0), BYE: (_ANYONE, 0), STATS: (_ANYONE, 0), SNAPSHOT: ((CHIEF,), 0), FINISH: ((CHIEF,), 0),
         ABORT: ((CHIEF,), 2), INIT: ((CHIEF,), 10), SCORED: ((EVALUATOR,), 1), PULL: (_TRAINERS, 1),
         PUSH: (_TRAINERS, 4)}
MAX_GRADIENT = 1e15  # larger entries would take float32 weights or momentum to inf within a few updates
MAX_BUFFER = 1e30  # BatchNorm statistics and counts: they must stay within float32 in the workers' models

STALENESS_BINS = 64  # staleness histogram: 0..62 updates, and 63 or more

# Optimizer state that lives on the ps, per optimizer (the keys of torch.optim's per-parameter state).
STATE_KEYS = {"sgd": ("momentum_buffer",), "nesterov": ("momentum_buffer",),
              "adam": ("step", "exp_avg", "exp_avg_sq"), "adamw": ("step", "exp_avg", "exp_avg_sq")}

# --------------------------------------------------------------------------------------- HELLO
TOKEN_ENV = "CNNTRAIN_PS_TOKEN"
PUBLIC_TOKEN = "cnntrain async-ps: no token set"  # both ends without a token: the digest is still checked
NONCE_WORDS = 4  # 128 random bits per link
PROOF_WORDS = 8  # HMAC-SHA256, as 32-bit words (each exact in the header's float64 slots)
IDENTITY = 6  # role, index, fingerprint, #workers, #ps, ps: the HELLO numbers the proof covers
_DOMAIN = b"cnntrain-ps-hello-1"


def job_token(cfg) -> str:
    """This process's ps token: ``ps_token`` in the config, else ``$CNNTRAIN_PS_TOKEN``, else ""."""
    return getattr(cfg, "ps_token", "") or os.environ.get(TOKEN_ENV, "")


def new_nonce() -> tuple[int, ...]:
    return tuple(secrets.randbits(32) for _ in range(NONCE_WORDS))


def _words(data: bytes) -> tuple[int, ...]:
    return struct.unpack(f">{len(data) // 4}I", data)


def proof(token: str, nonce: tuple[int, ...], identity: tuple[int, ...]) -> tuple[int, ...]:
    """HMAC-SHA256(token, nonce + identity) as ``PROOF_WORDS`` 32-bit words."""
    message = _DOMAIN + struct.pack(f">{NONCE_WORDS}I", *nonce) + struct.pack(f">{IDENTITY}q", *identity)
    return _words(hmac.new((token or PUBLIC_TOKEN).encode(), message, hashlib.sha256).digest())


def proof_matches(token: str, nonce: tuple[int, ...], identity: tuple[int, ...], given: tuple[int, ...]) -> bool:
    """Whether ``given`` is the proof for this nonce and identity (compared in constant time)."""
    if len(given) != PROOF_WORDS or not all(0 <= w < 2**32 for w in given):
        return False
    expected = struct.pack(f">{PROOF_WORDS}I", *proof(token, nonce, identity))
    return hmac.compare_digest(expected, struct.pack(f">{PROOF_WORDS}I", *given))
