"""``fxopt.optimize`` returning the generated GraphModule (``keep_class=False``), for tests that read
the rewritten graph or save it as source. The default (the user's class kept) is tested in
test_keep_class.py, test_fuzz.py and test_bad_inputs.py."""

import functools

import fxopt

optimize_to_graph = functools.partial(fxopt.optimize, keep_class=False)
