"""The tiny reasoner shipped with mrt-engine: pair-sum search task (task.py), noisy-searcher traces
(traces.py), tokenizer (tokenizer.py), CPU SFT (sft.py), measured properties (report.py), and the
trained model folder (model/, returned by `mrt_engine.default_model_path()`)."""
