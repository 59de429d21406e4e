import json, torch, llmpatch, sys
torch.set_num_threads(1)
model, tok = llmpatch.load_model("gemma3-270m")
samples = [json.loads(l) for l in open(__import__("pathlib").Path(__file__).parent / "global" / "samples.dev.jsonl")]
ratio, window = float(sys.argv[1]), int(sys.argv[2])
ok_r = ok_c = 0
for s in samples:
    ids = torch.tensor([s["context_ids"] + s["question_ids"]])
    rec = {}
    with llmpatch.patched(model, "reform", ratio=ratio, window=window, observe=window) as p:
        m = p.methods[0]; ch = m._choose
        m._choose = lambda sc: rec.setdefault("kept", ch(sc))
        out = model.generate(ids, max_new_tokens=s["max_new_tokens"], do_sample=False)
    g = ids[:, torch.cat([torch.arange(16), rec["kept"]])]
    o2 = model.generate(g, max_new_tokens=s["max_new_tokens"], do_sample=False)
    a, b = tok.decode(out[0, ids.shape[1]:]), tok.decode(o2[0, g.shape[1]:])
    ok_r += s["answers"][0] in a; ok_c += s["answers"][0] in b
    print(s["family"], s["answers"][0] in a, s["answers"][0] in b, repr(a[:30]), repr(b[:30]), flush=True)
print("reform", ok_r, "contiguous", ok_c)
