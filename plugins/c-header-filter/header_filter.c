/*
 * header_filter.c: the `header-filter` example plugin, written in C.
 *
 * Drops messages by header rules, exactly like plugins/header-filter (Rust),
 * to show that any language with a component toolchain can implement the
 * `filter` world of wit/sluice.wit. Config keys (repeatable, any order):
 *   drop=NAME=VALUE   drop when a header NAME equals VALUE
 *   drop=NAME         drop when a header NAME is present
 *   require=NAME      drop when no header NAME is present
 *   max-payload=N     drop when the payload is longer than N bytes
 * Every other message is accepted. The drop reason names the rule.
 *
 * Build: `make` (see Makefile and README.md in this directory).
 *
 * No stdio: printf-family functions pull in wasi-libc's file descriptors,
 * which would make the component import WASI, and Sluice plugins may import
 * nothing but `sluice:plugin/host`. Messages are built with `struct text`.
 *
 * Memory rules of the generated bindings (gen/filter.h): arguments are owned
 * by the callee (free them), results are freed by the bindings after the
 * host has copied them (so they must be heap-allocated: *_string_dup).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gen/filter.h"

enum rule_kind { RULE_EQUALS, RULE_PRESENT, RULE_MISSING, RULE_MAX_PAYLOAD };

struct rule {
  enum rule_kind kind;
  char *name;  /* header name (not for RULE_MAX_PAYLOAD) */
  char *value; /* RULE_EQUALS only */
  size_t max;
};

/* A bounded text builder (replaces snprintf, see above). */
struct text {
  char buf[1024];
  size_t len;
};

static void put(struct text *t, const char *s) {
  while (*s && t->len + 1 < sizeof t->buf) t->buf[t->len++] = *s++;
  t->buf[t->len] = '\0';
}

static void put_u64(struct text *t, unsigned long long v) {
  char digits[24];
  size_t n = 0;
  do {
    digits[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  while (n) {
    char c[2] = {digits[--n], '\0'};
    put(t, c);
  }
}

static struct rule *rules;
static size_t rule_count;

/* A NUL-terminated heap copy of a component-model string. */
static char *cstr(const filter_string_t *s) {
  char *out = malloc(s->len + 1);
  if (out == NULL) abort();
  memcpy(out, s->ptr, s->len);
  out[s->len] = '\0';
  return out;
}

static bool str_eq(const filter_string_t *s, const char *c) {
  size_t n = strlen(c);
  return s->len == n && memcmp(s->ptr, c, n) == 0;
}

/* Sets *err to a heap copy of `a b c` and returns false. */
static bool fail(filter_string_t *err, const char *a, const char *b, const char *c) {
  struct text t = {.len = 0};
  put(&t, a);
  put(&t, b);
  put(&t, c);
  filter_string_dup(err, t.buf);
  return false;
}

static void clear_rules(void) {
  for (size_t i = 0; i < rule_count; i++) {
    free(rules[i].name);
    free(rules[i].value);
  }
  free(rules);
  rules = NULL;
  rule_count = 0;
}

/*
 * Parses a decimal size the way Rust's `str::parse::<usize>` does (an
 * optional `+`, digits, overflow checked), so errors read the same as the
 * Rust plugin's. Returns NULL or the error text, starting with "`: ".
 */
static const char *parse_size(const char *s, size_t *out) {
  size_t v = 0;
  if (*s == '\0') return "`: cannot parse integer from empty string";
  if (*s == '+' && s[1] != '\0') s++;
  for (; *s; s++) {
    if (*s < '0' || *s > '9') return "`: invalid digit found in string";
    size_t d = (size_t)(*s - '0');
    if (v > (SIZE_MAX - d) / 10) return "`: number too large to fit in target type";
    v = v * 10 + d;
  }
  *out = v;
  return NULL;
}

static bool parse_rule(const char *key, const char *value, struct rule *r,
                       filter_string_t *err) {
  memset(r, 0, sizeof *r);
  if (strcmp(key, "drop") == 0) {
    const char *eq = strchr(value, '=');
    if (eq == value || value[0] == '\0') {
      if (eq == NULL) return fail(err, "config `drop`: empty header name", "", "");
      return fail(err, "config `drop=", value, "`: empty header name");
    }
    if (eq != NULL) {
      r->kind = RULE_EQUALS;
      r->name = strndup(value, (size_t)(eq - value));
      r->value = strdup(eq + 1);
    } else {
      r->kind = RULE_PRESENT;
      r->name = strdup(value);
    }
  } else if (strcmp(key, "require") == 0) {
    if (value[0] == '\0') return fail(err, "config `require`: empty header name", "", "");
    r->kind = RULE_MISSING;
    r->name = strdup(value);
  } else if (strcmp(key, "max-payload") == 0) {
    const char *problem = parse_size(value, &r->max);
    if (problem != NULL) return fail(err, "config `max-payload=", value, problem);
    r->kind = RULE_MAX_PAYLOAD;
  } else {
    return fail(err, "unknown config key `", key, "` (expected drop, require, max-payload)");
  }
  return true;
}

bool exports_filter_init(filter_list_config_entry_t *config, filter_string_t *err) {
  bool ok = true;
  clear_rules();
  rules = calloc(config->len ? config->len : 1, sizeof *rules);
  if (rules == NULL) abort();
  for (size_t i = 0; ok && i < config->len; i++) {
    char *key = cstr(&config->ptr[i].f0);
    char *value = cstr(&config->ptr[i].f1);
    ok = parse_rule(key, value, &rules[rule_count], err);
    if (ok) rule_count++;
    free(key);
    free(value);
  }
  if (!ok) clear_rules();
  filter_list_config_entry_free(config);
  return ok;
}

static const sluice_plugin_types_header_t *find_header(const filter_message_t *msg,
                                                       const char *name,
                                                       const char *value) {
  for (size_t i = 0; i < msg->headers.len; i++) {
    const sluice_plugin_types_header_t *h = &msg->headers.ptr[i];
    if (str_eq(&h->f0, name) && (value == NULL || str_eq(&h->f1, value))) return h;
  }
  return NULL;
}

/* Writes the reason to drop `msg` into `why` and returns true, if a rule says so. */
static bool decide(const filter_message_t *msg, struct text *why) {
  for (size_t i = 0; i < rule_count; i++) {
    const struct rule *r = &rules[i];
    switch (r->kind) {
      case RULE_EQUALS:
        if (find_header(msg, r->name, r->value)) {
          put(why, "header ");
          put(why, r->name);
          put(why, "=");
          put(why, r->value);
          return true;
        }
        break;
      case RULE_PRESENT:
        if (find_header(msg, r->name, NULL)) {
          put(why, "header ");
          put(why, r->name);
          put(why, " present");
          return true;
        }
        break;
      case RULE_MISSING:
        if (!find_header(msg, r->name, NULL)) {
          put(why, "missing header ");
          put(why, r->name);
          return true;
        }
        break;
      case RULE_MAX_PAYLOAD:
        if (msg->payload.len > r->max) {
          put(why, "payload ");
          put_u64(why, msg->payload.len);
          put(why, " > ");
          put_u64(why, r->max);
          put(why, " bytes");
          return true;
        }
        break;
    }
  }
  return false;
}

static void verdict(const filter_message_t *msg, filter_filter_verdict_t *ret) {
  struct text why = {.len = 0};
  if (decide(msg, &why)) {
    ret->tag = SLUICE_PLUGIN_TYPES_FILTER_VERDICT_DROP;
    filter_string_dup(&ret->val.drop, why.buf);
  } else {
    ret->tag = SLUICE_PLUGIN_TYPES_FILTER_VERDICT_ACCEPT;
  }
}

bool exports_filter_filter(filter_message_t *msg, filter_filter_verdict_t *ret,
                           filter_string_t *err) {
  (void)err;
  verdict(msg, ret);
  filter_message_free(msg);
  return true;
}

void exports_filter_filter_batch(filter_list_message_t *msgs,
                                 filter_list_result_filter_verdict_string_t *ret) {
  ret->len = msgs->len;
  ret->ptr = calloc(msgs->len ? msgs->len : 1, sizeof *ret->ptr);
  if (ret->ptr == NULL) abort();
  for (size_t i = 0; i < msgs->len; i++) {
    ret->ptr[i].is_err = false;
    verdict(&msgs->ptr[i], &ret->ptr[i].val.ok);
  }
  filter_list_message_free(msgs);
}
