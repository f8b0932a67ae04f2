// Renders the math that pymdownx.arithmatex (generic mode) wraps in \( ... \) and \[ ... \],
// with the KaTeX files vendored under javascripts/vendor/katex: the site needs no network.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  });
});
