#!/usr/bin/env bash
# The four bugs planted by hand in issue 16, one at a time, in a throwaway worktree of HEAD: each must fail
# at least one default-suite test. Usage: bash eval/planted_bugs.sh  (about 4 minutes on the 2-core CPU)
set -u
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
work=$(mktemp -d)/planted
git -C "$repo" worktree add -q --detach "$work" HEAD
trap 'git -C "$repo" worktree remove --force "$work"' EXIT
cd "$work"
run() {  # name, file, python-replacement, tests...
  local name=$1 file=$2 old=$3 new=$4; shift 4
  git checkout -q -- .
  python - "$file" "$old" "$new" <<'PY'
import sys
path, old, new = sys.argv[1:]
s = open(path).read()
assert s.count(old) == 1, (path, old)
open(path, "w").write(s.replace(old, new))
PY
  echo "=== $name"
  PYTHONPATH=$PWD OMP_NUM_THREADS=1 timeout 1200 python -m pytest -q -p no:cacheprovider "$@" 2>&1 | grep -E "^FAILED|passed|failed" | sed 's/ - .*//' | head -12
}
run "bonus token from the previous row of p" massv/speculative/acceptance.py \
  "index = num_accepted.view(1, 1).expand(1, target_probs.shape[-1])" \
  "index = (num_accepted - (num_accepted == num_drafts).long()).view(1, 1).expand(1, target_probs.shape[-1])" \
  tests/test_speculative_sampling.py tests/test_acceptance.py
run "acceptance rate over proposed drafts" massv/speculative/stats.py \
  "        judged = sum(self.judged_drafts)" "        judged = sum(self.proposed_drafts)" tests/test_stats.py tests/test_evaluate.py
run "a rejection also rolls back the accepted drafts (Qwen2.5-VL tests only)" massv/speculative/engine.py \
  "verifier.rollback(num_drafts - num_accepted)" "verifier.rollback(num_drafts if num_accepted < num_drafts else 0)" \
  tests/test_speculative.py -k qwen
run "Wanda replaced by magnitude" massv/compress/sparsity.py \
  "scores = wanda_scores(module.weight, norms[name]) if score == \"wanda\" else module.weight.detach().abs().float()" \
  "scores = module.weight.detach().abs().float()" tests/test_compress.py
git checkout -q -- .
