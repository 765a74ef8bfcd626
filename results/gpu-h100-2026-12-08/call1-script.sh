# one call: split-K GEMV vs cuBLAS, alone and in the fast path's decode (issue 26); compare 2b, then the 2b gate (issue 23)
source .whl/common.sh
START=$(date +%s)
left() { local l=$(( ${DEADLINE:-570} - ($(date +%s) - START) )); [ $l -lt $1 ] && echo $l || echo $1; }
export PYTHONPYCACHEPREFIX=/tmp/pyc
B="env GRANITE_SPEECH_BENCH_VARIANTS=2b python -m pytest -m benchmark -p no:cacheprovider -s"
t bench-gemv timeout $(left 100) env GRANITE_SPEECH_BENCH_OUT=$OUT/bench-gemv.json python -m pytest -m benchmark -p no:cacheprovider -s suites/bench/test_gemv_benchmarks.py
t splitk-tests-tiny timeout $(left 60) python -m pytest suites/test_fast_generate.py --device cuda -p no:cacheprovider -q -k "splitk or gemv" -rs
t compare-tiny-splitk timeout $(left 60) python -m parity.granite compare --fast-gemv splitk --device cuda --case "padded batch of 3" --json $OUT/tiny-splitk.json
pack
t bench-2b-decode-splitk timeout $(left 170) env GRANITE_SPEECH_BENCH_OUT=$OUT/bench-2b-decode-splitk.json GRANITE_SPEECH_BENCH_IMPLS=fast,fast_splitk,fast_compiled,fast_compiled_splitk $B suites/bench/test_benchmarks.py -k "test_decode"
pack
t fixture-2b timeout $(left 80) python -c "from parity.granite.fixtures import build_checkpoint; print(build_checkpoint('2b', seed=0))"
t compare-2b-float32 timeout $(left 110) python -m parity.granite compare --model 2b --device cuda --json $OUT/2b-float32.json
pack
t gate-2b timeout $(left 300) python -m pytest suites/ --model 2b --device cuda -p no:cacheprovider -q --durations=40 --junitxml=$OUT/gate-2b.xml
pack
