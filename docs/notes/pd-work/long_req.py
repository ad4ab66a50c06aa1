import json, random, sys, threading, urllib.request

P, D, BPORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(7)
prompt = [rng.randrange(3, 2000) for _ in range(2500)]
json.dump(prompt, open("/tmp/pd_work/long_prompt.json", "w"))
payload = {
    "input_ids": prompt,
    "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True},
    "bootstrap_host": "127.0.0.1",
    "bootstrap_port": BPORT,
    "bootstrap_room": rng.randint(0, 2**63 - 1),
}
out = {}


def post(name, url):
    try:
        req = urllib.request.Request(
            url + "/generate",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            out[name] = json.loads(r.read())
    except Exception as e:
        out[name] = repr(e)[:300]


ts = [threading.Thread(target=post, args=(n, u)) for n, u in (("prefill", P), ("decode", D))]
[t.start() for t in ts]
[t.join() for t in ts]
d = out["decode"]
print("decode:", d["output_ids"] if isinstance(d, dict) else d)
print(
    "prefill:", out["prefill"]["output_ids"] if isinstance(out["prefill"], dict) else out["prefill"]
)
