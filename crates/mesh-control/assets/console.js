// The console works without this file; it only adds the copy button for a new auth key's secret.
"use strict";
document.querySelectorAll("button[data-copy]").forEach((button) => {
  button.addEventListener("click", async () => {
    const field = document.getElementById(button.dataset.copy);
    field.select();
    try {
      await navigator.clipboard.writeText(field.value);
      button.textContent = "Copied";
    } catch {
      // No clipboard access (an insecure origin, or permission refused): the text is selected to copy.
      button.textContent = "Selected: press Ctrl+C";
    }
  });
});
