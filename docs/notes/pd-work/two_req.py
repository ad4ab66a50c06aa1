"""The router's protocol by hand: the same JSON to prefill and decode at once."""

import json, random, sys, threading, urllib.request

P, D, BPORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
payload = {
    "input_ids": [10, 11, 12, 13, 14, 15, 16, 17] * 4,
    "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
    "bootstrap_host": "127.0.0.1",
    "bootstrap_port": BPORT,
    "bootstrap_room": random.randint(0, 2**63 - 1),
}
out = {}


def post(name, url):
    try:
        req = urllib.request.Request(
            url + "/generate",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=90) as r:
            out[name] = (r.status, json.loads(r.read()))
    except Exception as e:
        out[name] = ("error", repr(e)[:300])


ts = [threading.Thread(target=post, args=(n, u)) for n, u in (("prefill", P), ("decode", D))]
[t.start() for t in ts]
[t.join() for t in ts]
for k, v in out.items():
    print(k, v[0], json.dumps(v[1])[:400] if not isinstance(v[1], str) else v[1])
