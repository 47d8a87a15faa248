"""Not code: this file makes configs/ the package `gptscale._configs`, so that the example
run configs ship inside an installed gptscale (pyproject.toml maps the folder into the
package; `gptscale launch-scripts DIR` copies them out). Edit the YAML here."""
