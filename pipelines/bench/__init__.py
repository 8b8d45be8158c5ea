"""Benchmarks that measure side by side in one run and print ratios: train, decode, kernel, slack, serve,
overhead."""

# `sparta bench slack`'s end-to-end ART settings (here, light, so the CLI's --help needs no torch)
SLACK_RUNS = ("certified", "certified+score_bound=box+ball",
              "certified+score_bound=box+ball+certificate=relative+eps=0.01",
              "certified+score_bound=box+ball+certificate=relative+eps=0.1", "skip", "skip+skip_lambda=0.1")
