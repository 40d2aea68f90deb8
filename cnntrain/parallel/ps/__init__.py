"""Asynchronous parameter-server training (``--strategy async-ps``): ps, chief, worker, evaluator.

    cnntrain train --strategy async-ps --ps 2 --workers 3 --evaluator --dataset cifar10 -n simplecnn
    cnntrain train --strategy async-ps --role ps --ps-index 0 --ps-hosts a:2222,b:2222 --worker-hosts c,d
    cnntrain train --strategy async-ps --role chief --ps-hosts a:2222,b:2222 --worker-hosts c,d
    cnntrain train --strategy async-ps --role worker --worker-index 1 --ps-hosts a:2222,b:2222 --worker-hosts c,d
    cnntrain train --strategy async-ps --role evaluator --ps-hosts a:2222,b:2222 --worker-hosts c,d

``roles`` (which role this process plays), ``cluster`` (who is where, parameter and data shards),
``protocol`` (the requests and replies, the HELLO proof), ``frames`` (the wire format: a message as a
fixed header and raw tensor bytes, decoded and size-checked before the tensors are read),
``transport`` (a link: one TCP connection, its client end ``Link`` and server end ``Peer``),
``listener`` (a ps's listening socket and the handshakes up to each HELLO), ``server`` (the ps: its
links, the link cap, warnings about peers), ``handler`` (the ps's answer to each request: checks
against the role and the shard, updates, staleness), ``store`` (a ps's shard and optimizer),
``client`` (links to the ps), ``worker`` (the chief's and the workers' steps: the engine's
``train_step`` with a push / pull update), ``chief`` (run folder, checkpoints, logs), ``evaluator``,
``launch`` (every role on this machine).
"""
