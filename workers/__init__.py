"""What runs on Ray's workers, as plain libraries Ray only calls (each importable and runnable without
Ray): `training` (the loop, DeepSpeed glue, the Ray trial entry), `serving` (the engine, the OpenAI
protocol, the Serve replica, its metrics) and `data` (offline assets, datasets, tables, haystacks, NIAH
prompts). `hardware` says what the machine runs natively. workers never imports pipelines."""
