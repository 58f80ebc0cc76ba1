"""`opt-lm serve`: OpenAI's completions API over any of the three frameworks, with continuous batching.

    protocol.py   the request's fields checked, OpenAI's response, chunk and error objects (framework-free)
    sampling.py   logits processors, warpers, inverse-CDF sampling and logprobs in numpy
    text.py       a completion's text: stop strings, stream-safe pieces, logprobs' token strings
    engine.py     the scheduler: rows of a static cache joined and left between decode steps (numpy)
    torch_step.py, tf_step.py, flax_step.py   the two model calls the engine needs, one per framework
    steps.py      picks the framework's step model, importing only that framework
    app.py        the FastAPI app and the Server that ties them together

The command line is `opt_cli/serve.py`.
"""
