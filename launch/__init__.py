"""Not code: this file makes launch/ the package `gptscale._launch`, so that the launch
scripts ship inside an installed gptscale (pyproject.toml maps the folder into the package;
`gptscale launch-scripts DIR` copies them out). Edit the scripts here."""
