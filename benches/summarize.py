"""Reads the runs vs_llama_cpp.sh collected and prints the comparison table (stdlib only)."""
import glob, json, os, statistics, sys

out, pp, tg, threads, models = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
print(f"threads {threads}, pp{pp} / tg{tg}, median of runs; targets: decode >= 1.0x, prompt >= 0.8x\n")
print("| model | size | pp hypura | pp llama.cpp | pp ratio | tg hypura | tg llama.cpp | tg ratio |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for model in models:
    name = os.path.basename(model)
    hy = [json.loads(l) for l in open(f"{out}/{name}.hypura.jsonl") if l.strip()]
    ll = {"pp": [], "tg": []}
    for f in glob.glob(f"{out}/{name}.llama.*.json"):
        for rec in json.load(open(f)):
            kind = "pp" if rec["n_prompt"] > 0 and rec["n_gen"] == 0 else "tg"
            ll[kind].append(rec["avg_ts"])
    h_pp = statistics.median(r["pp_tok_s"] for r in hy)
    h_tg = statistics.median(r["tg_tok_s"] for r in hy)
    l_pp, l_tg = statistics.median(ll["pp"]), statistics.median(ll["tg"])
    rp, rt = h_pp / l_pp, h_tg / l_tg
    mark = lambda r, t: f"{r:.2f}x {'met' if r >= t else 'NOT met'}"
    size = os.path.getsize(model) / 1e6
    print(f"| {name} | {size:.0f} MB | {h_pp:.1f} | {l_pp:.1f} | {mark(rp, 0.8)} | {h_tg:.1f} | {l_tg:.1f} | {mark(rt, 1.0)} |")
