import gc, os, time, json
_t = {"start": None, "total": 0.0, "n": [0, 0, 0], "by_gen": [0.0, 0.0, 0.0]}
def _cb(phase, info):
    if phase == "start":
        _t["start"] = time.process_time()
    elif _t["start"] is not None:
        d = time.process_time() - _t["start"]; _t["total"] += d; g = info["generation"]
        _t["n"][g] += 1; _t["by_gen"][g] += d
gc.callbacks.append(_cb)
def pytest_sessionfinish(session):
    wid = os.environ.get("PYTEST_XDIST_WORKER", "main")
    json.dump(_t | {"start": None}, open(f"/tmp/prof/gc-{wid}.json", "w"))
