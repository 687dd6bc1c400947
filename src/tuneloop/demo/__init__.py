"""``tuneloop demo``: a self-contained workspace (tiny base model, a ticket-routing task, a config) and the loop on it.

Entry points: :func:`tuneloop.demo.quick.run_demo` (``tuneloop demo --quick``: iteration 1, then held-out tickets
through the gateway) and :func:`tuneloop.demo.loop.run_loop` (``tuneloop demo``: the closed loop). The modules, by
concern:

* :mod:`~tuneloop.demo.quick` — the workspace (base model, data files, config) and iteration 1;
* :mod:`~tuneloop.demo.loop` — the closed loop: production, feedback, drift, iteration 2 as a canary;
* :mod:`~tuneloop.demo.users` — the loop's simulated users: tickets through the gateway, ratings and corrections;
* :mod:`~tuneloop.demo.tickets` — the task: support tickets and their routing labels, the loop's new intent;
* :mod:`~tuneloop.demo.corpus` — the synthetic general text the base model is pretrained and checked on;
* :mod:`~tuneloop.demo.base_model` — the tokenizer, the tiny Llama and its pretraining recipe, the shipped copy;
* :mod:`~tuneloop.demo.tables` — the data files ``demo/data/*.json``: the recipe (``RECOMMENDED``) and the word
  tables the generators draw from.

Nothing is downloaded and every generator is deterministic given its seed. How the recipe was found (what was
measured to matter): docs/benchmarks.md, "The demo's recipe".
"""
