"""The offline demo (``qvlm demo``): its plan (``plan.yaml``), the runner, the demo vision tower's
pretraining (``qvlm pretrain-vision``), the HTML report, and ``qvlm smoke``. Nothing is imported
here: ``qvlm.demo.runner.run_demo`` is the entry point."""
