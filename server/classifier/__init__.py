"""The fitted training/inference/idle classifier: features in, verdicts with probabilities out.

``model`` loads the versioned JSON artifact and evaluates it with numpy only (the verifier is a
security boundary and never unpickles); ``dataset``, ``fit`` and ``evaluate`` rebuild and judge
the artifact from labelled recordings; ``aggregate`` turns window verdicts into a recording's
verdict with hysteresis; ``compute`` estimates FLOP per window; ``evasion`` transforms
recordings the way a tenant hiding training might.
"""
