// The admin console in a real browser: headless Chromium (Debian's) driven by playwright-core, one phase per
// run, called by tests/console.rs between the steps it takes on real nodes. Every check throws on failure,
// so the process exits non-zero and the Rust test fails with this output.
//
// Environment: CONSOLE_URL (https://server:port), ADMIN_TOKEN_FILE, PLAYWRIGHT_DIR (where playwright-core is
// installed), STATE_FILE (the signed-in browser's cookies between phases), SHOTS (screenshot directory),
// LINK (a one-time sign-in link, for the last phase).

import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(process.env.PLAYWRIGHT_DIR + "/");
const { chromium } = require("playwright-core");

const url = process.env.CONSOLE_URL;
const shots = process.env.SHOTS;
const stateFile = process.env.STATE_FILE;
const phase = process.argv[2];

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

function log(message) {
  console.error(`[browser ${phase}] ${message}`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  // Root in a test namespace: Chromium's own sandbox needs user namespaces it is not given here.
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
  timeout: 30_000,
});

async function newContext(signedIn, width = 1280) {
  const options = { ignoreHTTPSErrors: true, viewport: { width, height: 900 } };
  if (signedIn) options.storageState = stateFile;
  const context = await browser.newContext(options);
  context.setDefaultTimeout(10_000);
  return context;
}

async function shot(page, name, options = {}) {
  await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true, ...options });
  log(`screenshot ${name}.png`);
}

/// No page may be wider than a 360 px phone.
async function fitsPhone(context, path) {
  const page = await context.newPage();
  await page.setViewportSize({ width: 360, height: 740 });
  await page.goto(url + path);
  const width = await page.evaluate(() => document.documentElement.scrollWidth);
  check(width <= 360, `${path} is ${width} px wide at 360 px`);
  return page;
}

const result = {};
let failed = false;
try {
  if (phase === "sign-in-and-key") {
    const context = await newContext(false);
    const page = await context.newPage();
    await page.goto(url + "/admin/");
    check(page.url().endsWith("/admin/login"), `not sent to sign in: ${page.url()}`);
    await shot(page, "login");
    // Keyboard only: the token field has focus, Enter submits.
    const token = readFileSync(process.env.ADMIN_TOKEN_FILE, "utf8").trim();
    await page.keyboard.type("not the token");
    await page.keyboard.press("Enter");
    await page.getByRole("alert").filter({ hasText: "not the admin token" }).waitFor();
    await page.locator("#token").fill("");
    await page.locator("#token").focus();
    await page.keyboard.type(token);
    await Promise.all([page.waitForURL("**/admin/machines"), page.keyboard.press("Enter")]);
    const cookie = (await context.cookies()).find((c) => c.name === "meshd_console");
    check(cookie, "no session cookie");
    check(cookie.httpOnly && cookie.secure && cookie.sameSite === "Strict", `cookie ${JSON.stringify(cookie)}`);
    check(cookie.expires > Date.now() / 1000 && cookie.expires < Date.now() / 1000 + 9 * 3600, "cookie expiry");
    check(await page.evaluate(() => document.cookie) === "", "a script can read the session cookie");
    await shot(page, "machines-empty");

    await page.getByRole("navigation").getByRole("link", { name: "Keys" }).click();
    await page.getByLabel("Reusable").check();
    await page.getByLabel("Ephemeral").check();
    await page.getByLabel("Tags").fill("tag:connector");
    await page.getByLabel("Expires after").selectOption("1d");
    await page.getByRole("button", { name: "Create key" }).click();
    await page.waitForURL("**/admin/keys?done=key-created");
    const secret = await page.locator("#secret").inputValue();
    check(secret.startsWith("mkey-"), `the key: ${secret}`);
    await page.getByText("reusable, ephemeral, tags tag:connector, expires in 1 d").waitFor();
    await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: url });
    await page.getByRole("button", { name: "Copy" }).click();
    await page.getByRole("button", { name: /Copied|Selected/ }).waitFor();
    await shot(page, "keys", { mask: [page.locator("#secret")] });
    // The page that shows it came by a redirect: a reload or Back shows it no more and makes no second key.
    await page.reload();
    check(!(await page.content()).includes(secret), "the secret is shown again on reload");
    check(await page.locator("tbody tr").count() === 1, "a reload made another key");
    await page.goBack();
    check(!(await page.content()).includes(secret), "the secret is shown again by Back");
    await context.storageState({ path: stateFile });
    result.key = secret;
  } else if (phase === "approve") {
    const context = await newContext(true);
    const page = await context.newPage();
    await page.goto(url + "/admin/machines?q=tag:connector&state=online");
    await page.getByText("2 of 2 machines").waitFor();
    await page.getByText("awaiting approval").waitFor();
    await shot(page, "machines");
    const phone = await fitsPhone(context, "/admin/machines");
    await shot(phone, "machines-360");
    // From just before the click: the figure includes the form's round trip and the page after it.
    result.approved_at_ms = Date.now();
    await page.getByRole("button", { name: "Approve 10.77.0.0/24 from router" }).click();
    await page.getByRole("status").filter({ hasText: "Route approved" }).waitFor();
    check(await page.getByText("primary").count() === 1, "the approved route is not primary");
    await page.getByRole("link", { name: "router", exact: true }).click();
    await page.getByText("router.mesh.internal").waitFor();
    await shot(page, "machine");
  } else if (phase === "rest") {
    const context = await newContext(true);
    const page = await context.newPage();

    // Policy: a broken file is refused at its line, the refused save stores nothing, a good one is versioned.
    await page.goto(url + "/admin/policy");
    const broken = '{\n  "acls": [\n    {"action": "accept" "src": ["*"], "dst": ["*:*"]},\n  ],\n}\n';
    await page.getByLabel("Policy (HuJSON").fill(broken);
    await page.getByRole("button", { name: "Check" }).click();
    await page.locator("#policy-errors").getByRole("link", { name: "line 3" }).waitFor();
    check(await page.locator("#line-3.error-line").count() === 1, "line 3 is not marked");
    await shot(page, "policy-error");
    await page.getByRole("button", { name: "Save" }).click();
    await page.locator("#policy-errors").waitFor();
    await page.getByText("No versions yet.").waitFor();
    const good = '{\n  // Everyone may reach everything; tagged connectors serve the cluster.\n  "tagOwners": {"tag:connector": []},\n  "acls": [\n    {"action": "accept", "src": ["*"], "dst": ["*:*"]},\n  ],\n  "tests": [\n    {"src": "tag:connector", "accept": ["10.77.0.2:443"]},\n  ],\n}\n';
    await page.getByLabel("Policy (HuJSON").fill(good);
    await page.getByRole("button", { name: "Show changes" }).click();
    await page.locator("table.diff tr.add").first().waitFor();
    await shot(page, "policy-diff");
    await page.getByRole("button", { name: "Save" }).click();
    await page.getByRole("status").filter({ hasText: "Policy saved as a new version" }).waitFor();
    await page.getByRole("cell", { name: /admin console/ }).waitFor();
    await shot(page, "policy");

    // DNS: every machine's names; MagicDNS off and on again.
    await page.getByRole("navigation").getByRole("link", { name: "DNS" }).click();
    await page.getByRole("cell", { name: "router.mesh.internal" }).waitFor();
    await page.getByRole("button", { name: "Turn MagicDNS off" }).click();
    await page.getByRole("status").filter({ hasText: "MagicDNS is off" }).waitFor();
    await page.getByRole("button", { name: "Turn MagicDNS on" }).click();
    await page.getByRole("status").filter({ hasText: "MagicDNS is on" }).waitFor();
    await shot(page, "dns");

    await page.getByRole("navigation").getByRole("link", { name: "Users" }).click();
    await page.getByLabel("New user").fill("alice@example.com");
    await page.getByRole("button", { name: "Add user" }).click();
    await page.getByRole("cell", { name: "alice@example.com", exact: true }).waitFor();
    await shot(page, "users");

    // Refusals: a form without the CSRF token, with a session; a form and a page without a session.
    const forged = await context.request.post(url + "/admin/users", { form: { name: "mallory@example.org" }, maxRedirects: 0 });
    check(forged.status() === 403, `a form without the CSRF token answered ${forged.status()}`);
    const stranger = await newContext(false);
    const anonymous = await stranger.request.post(url + "/admin/users", { form: { name: "eve@example.org", csrf: "0" }, maxRedirects: 0 });
    check(anonymous.status() === 403, `a form without a session answered ${anonymous.status()}`);
    const strangerPage = await stranger.newPage();
    await strangerPage.goto(url + "/admin/keys");
    check(strangerPage.url().endsWith("/admin/login"), "a page without a session was shown");
    await page.reload();
    for (const refused of ["mallory@example.org", "eve@example.org"]) {
      check(!(await page.content()).includes(refused), `a refused form made ${refused}`);
    }

    // Every link on every page leads somewhere; every page fits a phone; the keyboard reaches the forms.
    const pages = ["/admin/machines", "/admin/keys", "/admin/policy", "/admin/dns", "/admin/users"];
    const machineLinks = await (async () => {
      await page.goto(url + "/admin/machines");
      return page.locator("main a").evaluateAll((as) => as.map((a) => a.getAttribute("href")));
    })();
    const visited = new Set();
    for (const path of [...pages, ...machineLinks.filter((h) => h.startsWith("/admin/machines/"))]) {
      await page.goto(url + path);
      const hrefs = await page.locator("a[href]").evaluateAll((as) => as.map((a) => a.getAttribute("href")));
      for (const href of hrefs) {
        const target = new URL(href, page.url());
        if (target.hash && target.pathname === new URL(page.url()).pathname) {
          check(await page.locator(target.hash).count() === 1, `${path}: anchor ${href} goes nowhere`);
          continue;
        }
        if (visited.has(target.href)) continue;
        visited.add(target.href);
        check(target.origin === new URL(url).origin, `${path} links off the console: ${href}`);
        const answer = await context.request.get(target.href);
        check(answer.status() === 200, `${path}: ${href} answered ${answer.status()}`);
      }
      const phone = await fitsPhone(context, path);
      await phone.close();
    }
    result.links_checked = visited.size;
    await page.goto(url + "/admin/keys");
    await page.keyboard.press("Tab");
    check(await page.evaluate(() => document.activeElement.textContent) === "Skip to content", "the first Tab");
    let reached = false;
    for (let i = 0; i < 30 && !reached; i++) {
      await page.keyboard.press("Tab");
      reached = await page.evaluate(() => document.activeElement.textContent === "Create key");
    }
    check(reached, "Tab never reaches the Create key button");

    // Sign out: the old cookie signs nothing in any more.
    await page.getByRole("button", { name: "Sign out" }).click();
    await page.waitForURL("**/admin/login");
    const replay = await newContext(true);
    const replayPage = await replay.newPage();
    await replayPage.goto(url + "/admin/machines");
    check(replayPage.url().endsWith("/admin/login"), "a signed-out cookie still works");

    // A one-time link signs in once.
    const linked = await newContext(false);
    const linkPage = await linked.newPage();
    await linkPage.goto(process.env.LINK);
    await shot(linkPage, "link");
    await Promise.all([linkPage.waitForURL("**/admin/machines"), linkPage.getByRole("button", { name: "Sign in" }).click()]);
    const again = await (await newContext(false)).newPage();
    await again.goto(process.env.LINK);
    await again.getByRole("button", { name: "Sign in" }).click();
    await again.getByRole("alert").filter({ hasText: "used already" }).waitFor();

    // Last, as it leaves a page behind: a page of another origin, in a signed-in browser, submitting a form
    // to the console. SameSite=Strict keeps the cookie home, and the token is missing anyway.
    log("cross-site form");
    const evil = await linked.newPage();
    await evil.setContent(`<form method="post" action="${url}/admin/users"><input name="name" value="trent@example.org"><input name="csrf" value="0"></form>`);
    const [crossSite] = await Promise.all([
      evil.waitForResponse((r) => r.url() === url + "/admin/users"),
      evil.evaluate(() => document.forms[0].submit()),
    ]);
    check(crossSite.status() === 403, `a cross-site form answered ${crossSite.status()}`);
    log("cross-site form refused");
  } else {
    throw new Error(`unknown phase ${phase}`);
  }
} catch (e) {
  failed = true;
  // What every open page showed when the check failed, for whoever reads the failure.
  for (const [i, context] of browser.contexts().entries()) {
    for (const [j, page] of context.pages().entries()) {
      await page.screenshot({ path: `${shots}/failed-${phase}-${i}-${j}.png`, fullPage: true }).catch(() => {});
      console.error(`--- page ${page.url()} (failed-${phase}-${i}-${j}.png):\n` + (await page.locator("main").innerText().catch(() => "")));
    }
  }
  throw e;
} finally {
  await browser.close();
}
console.log("RESULT " + JSON.stringify(result));
