# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "regex"];
if address :regex :domain "to" "^example\\.(com|net)$" {
  fileinto "yes";
} else {
  fileinto "no";
}
