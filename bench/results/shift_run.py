import json, sys, time
from dynaexq.demo import default_model
from dynaexq.eval import shift
from dynaexq.store.reader import StoreReader
from dynaexq.engine.load import resolve_store
from dynaexq.quant.precision import Precision as P
r = StoreReader(resolve_store(default_model()))
b20 = sum(0.2*r.expert_bytes(l,e,P.INT8)+0.8*r.expert_bytes(l,e,P.INT2) for l in r.layers for e in range(r.num_experts))
print("b20", b20, file=sys.stderr)
t=time.time()
out = shift.evaluate_shift(default_model(), policies=list(shift.SHIFT_POLICIES)+["uniform:int8","uniform:int2"], budgets=["int3"], progress=False)
print(shift.table(out["results"]))
out2 = shift.evaluate_shift(default_model(), policies=["dynaexq:hi=int8,lo=int2","frozen:hi=int8,lo=int2","calibrated:hi=int8,lo=int2"], budgets=[int(b20)], progress=False)
print(shift.table(out2["results"]))
json.dump({"int3": out, "b20": out2}, open("/tmp/shift/run1.json","w"))
print(time.time()-t)
