"""Compare the behaviour figures of two before/after captures (bench on tiny + 3-step SmolLM2 train)."""
import json, sys
a, b = sys.argv[1], sys.argv[2]
def bench(d):
    r = json.load(open(f"{d}/bench/results.json"))
    return {x["label"]: {k: x[k] for k in ("losses", "memory_by_role", "trainable_params", "total_params", "ok") if k in x} for x in r["runs"]}
def train(d):
    r = json.load(open(f"{d}/train/results.json"))
    return {k: r[k] for k in ("before", "after", "train_loss_first", "train_loss_last", "trainable_params", "memory_by_role", "tokens")}
ok = True
for name, f in (("bench", bench), ("train", train)):
    x, y = f(a), f(b)
    if x == y:
        print(f"{name}: identical ({len(json.dumps(x))} chars of figures)")
    else:
        ok = False
        print(f"{name}: DIFFERENT"); print(json.dumps(x, indent=1)); print(json.dumps(y, indent=1))
sys.exit(0 if ok else 1)
