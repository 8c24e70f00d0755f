"""A ClientApp that wraps fedlora's and corrupts the replies of some partitions (test only).

Partition 0 is honest; 1 sends NaN; 2 sends a tensor of the wrong shape; 3 leaves a
tensor out in round 1 and sends a hundredfold update in round 2 (above
``server.max_update_norm``). The ServerApp is fedlora's own.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedlora.config.app import from_run_config
from fedlora.flower import client_app, records

FAULTS = {1: {1: "nan", 2: "nan"}, 2: {1: "shape", 2: "shape"}, 3: {1: "missing", 2: "scale"}}

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return client_app.query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = client_app.train(msg, context, from_run_config(context.run_config))
    pid = int(context.node_config[records.PARTITION_ID])
    fault = FAULTS.get(pid, {}).get(int(msg.content[records.CONFIG][records.SERVER_ROUND]))
    if fault is None:
        return reply
    arrays = {k: a.numpy() for k, a in reply.content[records.ARRAYS].items()}
    first = sorted(arrays)[0]
    if fault == "nan":
        arrays[first] = arrays[first].copy()
        arrays[first].flat[0] = float("nan")
    elif fault == "shape":
        arrays[first] = arrays[first][..., :-1].copy()
    elif fault == "missing":
        del arrays[first]
    elif fault == "scale":
        arrays = {k: v * 100.0 for k, v in arrays.items()}
    reply.content[records.ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return reply
