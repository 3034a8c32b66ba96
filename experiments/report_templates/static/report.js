// Pagination of a query page's sequences. Page 1 is in the document; the others wait in inert <template>s,
// so a page of thousands of sequences lays out only the rows on screen.
document.addEventListener("DOMContentLoaded", () => {
  const list = document.getElementById("sequences");
  const pager = document.querySelector("nav.pager");
  if (!list || !pager) return;
  const pages = [Array.from(list.children)].concat(
    Array.from(document.querySelectorAll("template.page"), (t) => Array.from(t.content.children)));
  const label = pager.querySelector(".page-label");
  let current = 0;
  function show(index) {
    current = Math.max(0, Math.min(pages.length - 1, index));
    list.replaceChildren(...pages[current]);
    label.textContent = `page ${current + 1} of ${pages.length}`;
    pager.querySelector('[data-go="first"]').disabled = pager.querySelector('[data-go="prev"]').disabled = current === 0;
    pager.querySelector('[data-go="last"]').disabled = pager.querySelector('[data-go="next"]').disabled =
      current === pages.length - 1;
  }
  const moves = { first: () => 0, prev: () => current - 1, next: () => current + 1, last: () => pages.length - 1 };
  pager.addEventListener("click", (event) => {
    const go = event.target.closest("button")?.dataset.go;
    if (go) { show(moves[go]()); pager.scrollIntoView({ block: "nearest" }); }
  });
  show(0);
});
