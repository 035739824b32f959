# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto"];
if address :localpart :is "cc" "dave" {
  fileinto "yes";
} else {
  fileinto "no";
}
