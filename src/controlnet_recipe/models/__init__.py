"""Model builders: the tiny Stable Diffusion components and the evaluator network."""
