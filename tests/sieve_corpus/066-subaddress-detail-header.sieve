# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "subaddress"];
if address :detail :contains "to" "list" {
  fileinto "yes";
} else {
  fileinto "no";
}
