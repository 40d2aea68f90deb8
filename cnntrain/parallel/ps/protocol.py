"""Op codes of the requests a ps answers, and the status codes of its replies.

Request (client -> ps)        numbers                                      tensors
HELLO                         role, index, fingerprint, #workers, #ps, ps  -
INIT (chief)                  step, classes, C, H, W, steps/epoch, total,  params f32, buffers f64, optimizer
                              base lr, run stamp, optimizer-state mask     state f32 (one per key in the mask)
PULL                          wait for --max-staleness admission (0/1)     -
PUSH                          pulled version, leave the admitted set,      gradient f32 (empty: step skipped),
                              then pull, wait for admission                buffers f64
STATS, SNAPSHOT, FINISH, PING, BYE  -                                      -
ABORT                         role, index of the process that failed       -
SCORED (evaluator)            step of the checkpoint it scored             -

Reply status in the op field: OK, DONE (training is over), FAILED (role, index, cause: the job is
ending), RETRY (ask again), REFUSED (reason code, then details).
"""

HELLO, INIT, PULL, PUSH, STATS, SNAPSHOT, FINISH, ABORT, PING, SCORED, BYE = range(1, 12)
OK, DONE, FAILED, RETRY, REFUSED = range(5)

# FAILED causes
LOST, REPORTED, NEVER_CONNECTED, NOT_INITIALISED = range(4)
# REFUSED reasons
BAD_CONFIG, BAD_CLUSTER, DUPLICATE, WRONG_PS = range(4)

STALENESS_BINS = 64  # staleness histogram: 0..62 updates, and 63 or more

# Optimizer state that lives on the ps, per optimizer (the keys of torch.optim's per-parameter state).
STATE_KEYS = {"sgd": ("momentum_buffer",), "nesterov": ("momentum_buffer",),
              "adam": ("step", "exp_avg", "exp_avg_sq"), "adamw": ("step", "exp_avg", "exp_avg_sq")}
